"""Third-party warnings that say nothing to our users, silenced once where the package is imported.

Every ``kedro`` command used to start with them (MLflow's pyfunc type-hint advice, kedro-mlflow's pydantic-v1 style
configs, SQLAlchemy's ``noload``, Kedro 1.7 reading ``model_fields`` from instances): noise that hid our own log lines.
Each filter names one message of one library, so a new warning, ours or theirs, still shows. Kedro calls
:func:`silence_third_party_warnings` before it loads any plugin (the ``kedro.init`` entry point in pyproject.toml).
MLflow shows some warnings inside its own ``catch_warnings(): simplefilter("once")``, past any filter; Kedro logs
warnings through ``logging`` (logger ``py.warnings``), so a filter on that logger drops them too
(:class:`ThirdPartyNoiseFilter`; Kedro's logging config may not name filter classes).
"""

from __future__ import annotations

import logging
import re
import warnings

#: (message regex, category, module regex) as for :func:`warnings.filterwarnings`.
THIRD_PARTY_NOISE: tuple[tuple[str, type[Warning], str], ...] = (
    (r".*Add type hints to the `predict` method", UserWarning, ""),
    (r"Support for class-based `config` is deprecated", DeprecationWarning, ""),
    (r"The ``noload`` loader strategy is deprecated", DeprecationWarning, ""),
    (r"Accessing the 'model_fields' attribute on the instance is deprecated", DeprecationWarning, ""),
    (r"pkg_resources is deprecated", UserWarning, ""),
)


def silence_third_party_warnings() -> None:
    """Ignore exactly the warnings of :data:`THIRD_PARTY_NOISE` (idempotent: filters are not duplicated)."""
    for message, category, module in THIRD_PARTY_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    captured = logging.getLogger("py.warnings")
    if not any(isinstance(f, ThirdPartyNoiseFilter) for f in captured.filters):
        captured.addFilter(ThirdPartyNoiseFilter())


class ThirdPartyNoiseFilter(logging.Filter):
    """A filter for the ``py.warnings`` logger: drops the captured warnings of :data:`THIRD_PARTY_NOISE`."""

    _patterns = tuple(re.compile(message, re.IGNORECASE) for message, _, _ in THIRD_PARTY_NOISE)

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(pattern.search(text) for pattern in self._patterns)
