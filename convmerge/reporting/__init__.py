"""The report as data, its rendering, and the in-depth explanation of one pair or region."""
