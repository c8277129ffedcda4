"""vlmserve: OpenAI-compatible serving for vision-language models.

The repository's top folders are its subpackages (see pyproject.toml): `vlmserve.frontend`
(HTTP), `vlmserve.scheduler` (batching, no torch), `vlmserve.workers` (torch models),
`vlmserve.shared` (messages and config), `vlmserve.deploy` (the command and launchers), and
the torch-free `vlmserve.client`. Importing this package imports none of them.
"""
