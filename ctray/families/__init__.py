"""Model families; each folder defines one FamilySpec (see ctray.registry)."""
