"""The ``unetrpp`` command line: one small module per command."""
