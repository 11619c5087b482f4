"""Leaves every layer may import: the recipe schema (``common.config``) and durable file writes
(``common.fileio``). Nothing here imports another package of this project."""
