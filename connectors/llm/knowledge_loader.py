"""Load knowledge bases from chatterbot-corpus style YAML files or the installed corpus package."""

from __future__ import annotations

import importlib.util
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import yaml

from processors.config import KnowledgeBaseConfig
from processors.knowledge import KnowledgeBase, pairs_from_dialogs

__all__ = ["CHATTERBOT_PREFIX", "load_dialogs", "load_knowledge_base", "load_knowledge_bases"]

logger = logging.getLogger(__name__)

CHATTERBOT_PREFIX = "chatterbot:"
"""Source prefix naming a file of the installed ``chatterbot-corpus`` package."""

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_NULL_TAG = "tag:yaml.org,2002:null"


class _TextLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that keeps plain scalars as written: ``yes``, ``7`` and ``1.10``
    stay text instead of becoming ``True``, ``7`` and ``1.1``; only ``null``/``~`` resolve."""


_TextLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag == _NULL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _corpus_root() -> Path:
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the chatterbot_corpus package is not installed "
            "(pip install chatterbot-corpus, or switchboard[embedded])"
        )
    return Path(spec.origin).parent / "data"


def _names(folder: Path, *, suffix: str = "") -> str:
    if suffix:
        found = sorted(p.stem for p in folder.glob(f"*{suffix}"))
    else:
        found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    return ", ".join(found) or "none"


def _resolve(source: str) -> Path:
    """Return the file ``source`` names; ``chatterbot:<language>/<topic>`` is looked up in the
    installed corpus package (``chatterbot_corpus/data/<language>/<topic>.yml``)."""
    if not source.startswith(CHATTERBOT_PREFIX):
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"knowledge source {source!r}: no such file")
        return path
    language, _, topic = source[len(CHATTERBOT_PREFIX) :].partition("/")
    if not (_NAME.match(language) and _NAME.match(topic)):
        raise FileNotFoundError(
            f"knowledge source {source!r}: expected 'chatterbot:<language>/<topic>', "
            "e.g. 'chatterbot:english/greetings'"
        )
    root = _corpus_root()
    folder = root / language
    if not folder.is_dir():
        raise FileNotFoundError(
            f"knowledge source {source!r}: no language {language!r} in chatterbot_corpus "
            f"(available: {_names(root)})"
        )
    path = folder / f"{topic}.yml"
    if not path.is_file():
        raise FileNotFoundError(
            f"knowledge source {source!r}: no topic {topic!r} for {language} "
            f"(available: {_names(folder, suffix='.yml')})"
        )
    return path


def load_dialogs(source: str) -> list[list[str]]:
    """Read the dialogs of one chatterbot-corpus style YAML file.

    The file holds ``conversations: [[statement, reply, ...], ...]``. It is parsed with a
    ``yaml.SafeLoader`` subclass that keeps plain scalars as text (``yes`` stays ``"yes"``, not
    ``True``); explicitly tagged non-strings are converted with ``str()``. Empty statements (and
    ``null``) are skipped, as are dialogs left empty. A dialog that is not a list (a quirk of
    some corpus files) is skipped with a warning.

    Args:
        source: A filesystem path, or ``chatterbot:<language>/<topic>`` for a file of the
            installed ``chatterbot-corpus`` package.

    Returns:
        The dialogs in file order, each a list of statements.

    Raises:
        FileNotFoundError: If the file does not exist; for ``chatterbot:`` sources the message
            lists the available languages or topics.
        ValueError: If the YAML is invalid or has no ``conversations`` list.
    """
    path = _resolve(source)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_TextLoader)
    except yaml.YAMLError as exc:
        raise ValueError(f"knowledge source {source!r}: invalid YAML: {exc}") from exc
    conversations = data.get("conversations") if isinstance(data, dict) else None
    if not isinstance(conversations, list):
        raise ValueError(f"knowledge source {source!r}: expected a 'conversations' list")
    dialogs: list[list[str]] = []
    skipped = 0
    for dialog in conversations:
        if not isinstance(dialog, list):
            skipped += 1
            continue
        statements = [str(s).strip() for s in dialog if s is not None]
        statements = [s for s in statements if s]
        if statements:
            dialogs.append(statements)
    if skipped:
        logger.warning("knowledge source %r: skipped %d malformed dialogs", source, skipped)
    return dialogs


def load_knowledge_base(cfg: KnowledgeBaseConfig) -> KnowledgeBase:
    """Build one knowledge base from all of ``cfg.sources``, in order (earlier answers win).

    Raises:
        FileNotFoundError: If a source does not exist (see :func:`load_dialogs`).
        ValueError: If a source is not a valid corpus file.
    """
    pairs: list[tuple[str, str]] = []
    for source in cfg.sources:
        pairs.extend(pairs_from_dialogs(load_dialogs(source)))
    return KnowledgeBase(pairs, min_score=cfg.min_score)


def load_knowledge_bases(cfgs: Mapping[str, KnowledgeBaseConfig]) -> dict[str, KnowledgeBase]:
    """Build every configured knowledge base (``SwitchboardConfig.knowledge_bases``), by name.

    Raises:
        FileNotFoundError: If a source does not exist; the message names the source.
        ValueError: If a source is not a valid corpus file.
    """
    return {name: load_knowledge_base(cfg) for name, cfg in cfgs.items()}
