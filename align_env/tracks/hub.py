"""Loaders for the real data on the Hugging Face hub, through ``datasets``.

Each loader takes the hub name by default; pass ``data_files`` (split -> local JSON/JSONL/Parquet
file in the same schema) to load local copies instead, which is how the tests run them offline.
All loaders return the same shapes as the embedded sets (PromptItem / PreferencePair).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from align_env.errors import AlignEnvError
from align_env.tracks.track import PreferencePair, PromptItem

TLDR = "trl-lib/tldr"
SUMMARIZE_FROM_FEEDBACK = "openai/summarize_from_feedback"
HH_RLHF = "Anthropic/hh-rlhf"

_TLDR_PROMPT = re.compile(
    r"SUBREDDIT:\s*(?:r/)?(?P<forum>.*?)\s*\n+\s*TITLE:\s*(?P<title>.*?)\s*\n+\s*POST:\s*(?P<post>.*?)\s*(?:TL;DR:\s*)?$",
    re.DOTALL,
)
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def _load_split(path: str, split: str, *, name: str | None = None, data_dir: str | None = None,
                data_files: Mapping[str, str] | None = None):
    import datasets

    if data_files is not None:
        if split not in data_files:
            raise AlignEnvError(f"data_files has no entry for split {split!r} (has {sorted(data_files)})")
        file = str(data_files[split])
        builder = "parquet" if file.endswith(".parquet") else "json"
        return datasets.load_dataset(builder, data_files={split: file}, split=split)
    return datasets.load_dataset(path, name, data_dir=data_dir, split=split)


def _take(rows, max_items: int | None):
    return rows if max_items is None else rows.select(range(min(max_items, len(rows))))


def _check_columns(rows, needed: tuple[str, ...], what: str) -> None:
    missing = [c for c in needed if c not in rows.column_names]
    if missing:
        raise AlignEnvError(f"{what}: missing columns {missing}; has {rows.column_names}")


def parse_tldr_prompt(text: str) -> dict[str, str]:
    """Split a TL;DR prompt ``SUBREDDIT: r/x\\nTITLE: ...\\nPOST: ...\\nTL;DR:`` into its fields."""
    m = _TLDR_PROMPT.match(text.strip())
    if not m:
        raise AlignEnvError(f"not a TL;DR prompt (expected SUBREDDIT/TITLE/POST): {text[:80]!r}")
    return m.groupdict()


def load_tldr(format_prompt: Callable[[str, dict], str], *, path: str = TLDR, split: str = "train",
              data_files: Mapping[str, str] | None = None, max_items: int | None = None) -> tuple[PromptItem, ...]:
    """TL;DR in prompt/completion form (``trl-lib/tldr``): one PromptItem per post, completion as reference."""
    rows = _take(_load_split(path, split, data_files=data_files), max_items)
    _check_columns(rows, ("prompt", "completion"), f"{path}[{split}]")
    items = []
    for i, row in enumerate(rows):
        fields = parse_tldr_prompt(row["prompt"])
        meta = {"title": fields["title"], "forum": fields["forum"]}
        items.append(PromptItem(id=f"tldr-{split}-{i:06d}", prompt=format_prompt(fields["post"], meta),
                                source=fields["post"], reference=row["completion"].strip(), meta=meta))
    return tuple(items)


def load_summarize_comparisons(format_prompt: Callable[[str, dict], str], *, path: str = SUMMARIZE_FROM_FEEDBACK,
                               split: str = "validation", data_files: Mapping[str, str] | None = None,
                               max_items: int | None = None) -> tuple[PreferencePair, ...]:
    """OpenAI summarize-from-feedback ``comparisons``: human choice between two summaries of a post."""
    rows = _take(_load_split(path, split, name="comparisons", data_files=data_files), max_items)
    _check_columns(rows, ("info", "summaries", "choice"), f"{path}[{split}]")
    pairs = []
    for i, row in enumerate(rows):
        info, summaries, choice = row["info"], row["summaries"], int(row["choice"])
        if choice not in (0, 1) or len(summaries) != 2:
            raise AlignEnvError(f"{path}[{split}] row {i}: choice must be 0/1 over two summaries")
        post = info.get("post") or info.get("article") or ""
        meta = {"title": info.get("title") or "", "forum": info.get("subreddit") or info.get("site") or ""}
        item = PromptItem(id=f"sff-{split}-{i:06d}", prompt=format_prompt(post, meta), source=post, meta=meta)
        pairs.append(PreferencePair(id=item.id, item=item, chosen=summaries[choice]["text"].strip(),
                                    rejected=summaries[1 - choice]["text"].strip(),
                                    why=f"human choice ({summaries[choice].get('policy', '')})"))
    return tuple(pairs)


def split_hh_dialogue(text: str) -> tuple[list[dict[str, str]], str]:
    """Split an HH-RLHF transcript into (messages before the last assistant turn, last assistant response)."""
    parts = _HH_TURN.split("\n\n" + text.lstrip("\n") if not text.startswith("\n\n") else text)
    turns = [(parts[i], parts[i + 1]) for i in range(1, len(parts) - 1, 2)]
    if not turns or turns[-1][0] != "Assistant":
        raise AlignEnvError(f"not an HH-RLHF transcript ending with an Assistant turn: {text[:80]!r}")
    messages = [{"role": "user" if who == "Human" else "assistant", "content": said.strip()}
                for who, said in turns[:-1]]
    return messages, turns[-1][1].strip()


def _hh_item(messages: list[dict[str, str]], item_id: str, meta: dict[str, Any]) -> PromptItem:
    if not messages or messages[-1]["role"] != "user":
        raise AlignEnvError(f"{item_id}: HH dialogue does not end with a human turn before the response")
    last = messages[-1]["content"]
    return PromptItem(id=item_id, prompt=last, source=last, meta=meta, history=tuple(messages[:-1]))


def load_hh(subset: str, *, path: str = HH_RLHF, split: str = "train", data_files: Mapping[str, str] | None = None,
            max_items: int | None = None, pairs: bool = False):
    """Anthropic HH-RLHF ``helpful-base`` or ``harmless-base``: dialogue turns and chosen/rejected.

    With ``pairs=False`` returns PromptItems (the dialogue up to the last human turn, the chosen reply as
    reference); with ``pairs=True`` returns PreferencePairs.
    """
    if subset not in ("helpful-base", "harmless-base"):
        raise AlignEnvError(f"HH subset must be 'helpful-base' or 'harmless-base', got {subset!r}")
    rows = _take(_load_split(path, split, data_dir=subset, data_files=data_files), max_items)
    _check_columns(rows, ("chosen", "rejected"), f"{path}/{subset}[{split}]")
    out = []
    for i, row in enumerate(rows):
        messages, chosen = split_hh_dialogue(row["chosen"])
        _, rejected = split_hh_dialogue(row["rejected"])
        meta = {"subset": subset}
        item = _hh_item(messages, f"hh-{subset}-{split}-{i:06d}", meta)
        if pairs:
            out.append(PreferencePair(id=item.id, item=item, chosen=chosen, rejected=rejected, why="human choice"))
        else:
            out.append(PromptItem(id=item.id, prompt=item.prompt, source=item.source, reference=chosen,
                                  meta=meta, history=item.history))
    return tuple(out)
