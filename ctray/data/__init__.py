"""Data layer: NIfTI I/O and validation, organ labels, phantom and contrast-phase simulators."""
