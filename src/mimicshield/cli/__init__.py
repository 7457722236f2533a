"""The ``mimicshield`` command line: one module per subcommand group, thin over the library."""
