"""Integrations of tokentrack with LLM client libraries, each an optional extra.

* :mod:`tokentrack_client.integrations.litellm`: ``TrackedLiteLLM``, a wrapper around
  ``litellm.acompletion`` (``pip install 'tokentrack[litellm]'``).

This package imports none of them: the base package does not depend on any LLM library, and
importing an integration whose library is missing raises an ``ImportError`` that says what to
install.
"""
