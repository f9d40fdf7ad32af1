"""The deployment checklist as commands: ``tokentrack audit``, ``verify``, ``monitor``,
``cleanup`` and ``cron`` (see docs/RUNBOOK.md for when to run which); and ``prices`` and
``budgets``.

* :mod:`~tokentrack_client.ops.audit`      pre/post-deploy figures (``audit baseline|compare``)
* :mod:`~tokentrack_client.ops.verify`     the post-deploy checks (``verify``)
* :mod:`~tokentrack_client.ops.functional` the staging tests in a sandbox (``verify --functional``)
* :mod:`~tokentrack_client.ops.monitor`    the monitoring queries and alerts (``monitor``)
* :mod:`~tokentrack_client.ops.sweep`      the expiry sweep and its pg_cron job
  (``cleanup``, ``cron``)
* :mod:`~tokentrack_client.ops.catalog`    what the SQL files create, for ``verify``
* :mod:`~tokentrack_client.ops.prices`     LiteLLM's price map into ``set_model_price``
  (``prices import``), the prices in effect (``prices list``)
* :mod:`~tokentrack_client.ops.budgets`    an account's budgets (``budgets set|list|show``)
"""

from tokentrack_client.ops._common import EXIT_FAILED, EXIT_OK, OpsError

__all__ = ["EXIT_FAILED", "EXIT_OK", "OpsError"]
