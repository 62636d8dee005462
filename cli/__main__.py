"""`python -m cli` is `fhirq`."""

from cli.main import main

main()
