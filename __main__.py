"""`python -m vlmserve ...`: the `vlmserve` command."""

from vlmserve.deploy.cli import main

main()
