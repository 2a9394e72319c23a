"""What every room stands on: the user-error base class, config-file loading, vendored-file
paths and the one derivation of positions from segment ids. Imports nothing else of hibari."""
