"""maskgit_fsq: FSQ tokenizer + MaskGIT transformer for CT contrast-phase translation (seed 004)."""
