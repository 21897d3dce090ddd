"""``python -m pipx_llama.cli`` runs the command line, as the ``pipx-llama`` script does."""

from pipx_llama.cli.main import main

main()
