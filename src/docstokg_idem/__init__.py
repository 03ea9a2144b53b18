"""docstokg_idem."""
