"""Thin command-line front ends: argument parsing, printing and exit codes over ``workflows``."""
