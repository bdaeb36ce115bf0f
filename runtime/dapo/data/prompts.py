"""Prompt data sets: ``load_prompts`` reads a prompt set (``.parquet`` or ``.jsonl``, local or ``s3://``) into
``PromptRecord`` objects, wraps raw problems in the DAPO instruction template exactly once,
de-duplicates on the final prompt text, drops prompts whose copies disagree on the answer, and
says what it did in a ``LoadReport`` (logged on the ``dapo.data.prompts`` logger). The public
DAPO-Math-17k on the hub repeats each prompt ~100 times and a few copies carry different answers;
training on that silently is a known pain point, so every dropped row is counted by reason.

The order prompts are trained in comes from `dapo.data.sampler`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, Union

logger = logging.getLogger("dapo.data.prompts")

# --------------------------------------------------------------------------- the DAPO template

DAPO_PROMPT_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of "
    "the form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_PROMPT_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'


def apply_dapo_template(problem: str) -> str:
    """Wrap a raw problem in the DAPO-Math-17k / DAPO-AIME instruction (the DAPO paper's
    data sets, arXiv 2503.14476).

    prefix + problem + suffix, where the prefix asks for a last line ``Answer: $Answer`` and the
    suffix repeats it; the reward function reads exactly that line.
    """
    return f"{DAPO_PROMPT_PREFIX}{problem}{DAPO_PROMPT_SUFFIX}"


def is_dapo_templated(text: str) -> bool:
    """True when ``text`` already carries the full DAPO instruction (prefix AND suffix).

    Checking both ends matters: DAPO-Math-17k holds a raw problem that itself begins with
    "Solve the following equation ...", which a prefix-only test would mistake for a wrapped one.
    """
    return text.startswith(DAPO_PROMPT_PREFIX) and text.rstrip().endswith(DAPO_PROMPT_SUFFIX)


# --------------------------------------------------------------------------- records and report

#: A row's ground truth: a string (math answers), or a JSON list / object (code test cases)
GroundTruth = Union[str, list, dict]


@dataclasses.dataclass
class PromptRecord:
    """One training / evaluation prompt.

    ``uid`` is a stable hash of the final prompt messages (``prompt_uid``), so the same prompt gets
    the same id in every run, file order and machine.
    """

    uid: str
    prompt: list[dict[str, str]]
    ground_truth: GroundTruth
    data_source: str
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def text(self) -> str:
        """Content of the last user message: the problem as the model sees it (after templating)."""
        return _last_user_content(self.prompt)

    @functools.cached_property
    def extra_info(self) -> dict[str, Any]:
        """What a scorer gets as ``extra_info``: the row's other columns, with the keys of its
        ``extra_info`` column (verl's per-row dict) at the top level, so a verl ``compute_score``
        reading ``extra_info["split"]`` works unchanged; plus the loader's ``row_index`` (and a
        GSM8K row's worked solution, ``answer_text``). JSON values only (it travels to remote
        scorers as JSON): a parquet value JSON has no type for (bytes, a timestamp) becomes its
        string."""
        info = {key: value for key, value in self.extra.items() if key != "extra_info"}
        nested = self.extra.get("extra_info")
        if isinstance(nested, dict):
            info.update(nested)
        elif nested is not None:
            info["extra_info"] = nested
        return json.loads(json.dumps(info, default=str))


@dataclasses.dataclass
class LoadReport:
    """What ``load_prompts`` read, dropped and kept.

    Invariant: rows_read == sum(bad_rows) + duplicates_dropped + conflicting_rows_dropped
    + truncated + kept.
    """

    path: str
    rows_read: int = 0
    bad_rows: dict[str, int] = dataclasses.field(default_factory=dict)
    duplicates_dropped: int = 0
    conflicting_prompts_dropped: int = 0
    conflicting_rows_dropped: int = 0
    truncated: int = 0
    kept: int = 0
    # Rows wrapped / found already wrapped, counted before length, conflict and duplicate filtering.
    templated: int = 0
    already_templated: int = 0
    seconds: float = 0.0

    @property
    def bad_rows_total(self) -> int:
        """Rows dropped for a defect of their own (all reasons together)."""
        return sum(self.bad_rows.values())

    def summary(self) -> str:
        """One readable line, e.g. for logs and the run's event stream."""
        bad = ", ".join(f"{count} {reason}" for reason, count in sorted(self.bad_rows.items())) or "none"
        parts = [
            f"{self.path}: read {self.rows_read} rows, kept {self.kept} prompts",
            f"bad rows {self.bad_rows_total} ({bad})",
            f"duplicates dropped {self.duplicates_dropped}",
            f"conflicting prompts dropped {self.conflicting_prompts_dropped} "
            f"({self.conflicting_rows_dropped} rows)",
        ]
        if self.truncated:
            parts.append(f"cut by max_prompts {self.truncated}")
        parts.append(f"templated {self.templated}, already templated {self.already_templated}")
        parts.append(f"{self.seconds:.2f}s")
        return "; ".join(parts)


# --------------------------------------------------------------------------- small pure helpers


def canonical_prompt_text(messages: list[dict[str, str]]) -> str:
    """Unambiguous text of a message list: length-prefixed ``role`` and ``content`` of each message.

    Length prefixes (netstring style) make distinct message lists map to distinct strings, whatever
    characters the contents hold; this is the de-duplication key and the input of ``prompt_uid``.
    """
    return "".join(f"{len(m['role'])}:{m['role']}{len(m['content'])}:{m['content']}" for m in messages)


def prompt_uid(messages: list[dict[str, str]]) -> str:
    """sha256 of ``canonical_prompt_text(messages)``, first 16 hex digits (64 bits)."""
    return hashlib.sha256(canonical_prompt_text(messages).encode("utf-8")).hexdigest()[:16]


def dataset_fingerprint(records: Iterable[PromptRecord]) -> str:
    """sha256 over the ordered uids: changes when prompts are added, removed or reordered.

    Store it beside a ``PromptSampler`` state so a resume against a different data set fails loudly.
    """
    digest = hashlib.sha256()
    for record in records:
        digest.update(record.uid.encode("ascii"))
        digest.update(b"\n")
    return digest.hexdigest()[:16]


_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)


def normalize_answer_value(value: Any) -> GroundTruth | None:
    """Turn a raw answer cell into a ground truth; None when it is not usable.

    * str: stripped; a GSM8K solution ending in ``#### N`` becomes ``N`` with thousands commas
      removed ("#### 1,234" -> "1234").
    * int: decimal; float: "5" for 5.0 (AMC stores answers as floats), repr otherwise; NaN/inf and
      bools are unusable.
    * list / dict (verl's code data sets keep test cases so): kept as a JSON value, handed to
      run-file and remote scorers unchanged (a value JSON has no type for becomes its string);
      an empty one is an empty answer (""). The built-in math scorers take strings only.
    """
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (list, tuple, dict)):
        return json.loads(json.dumps(value, default=str)) if value else ""
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        match = _GSM8K_FINAL.search(value)
        if match:
            return match.group(1).replace(",", "").strip()
        return value.strip()
    return None


def conflict_key(ground_truth: GroundTruth) -> str:
    """Normalised form used to decide whether two copies of a prompt disagree.

    Whitespace collapsed and one pair of surrounding ``$`` removed: "$ 23 $" and "23" agree, "6" and
    "64" do not. Deliberately light: the reward's normaliser decides correctness, this only decides
    whether the data set contradicts itself.
    """
    if not isinstance(ground_truth, str):  # a JSON ground truth (test cases): equal as data, key order aside
        return json.dumps(ground_truth, sort_keys=True, separators=(",", ":"))
    text = " ".join(ground_truth.split())
    if len(text) >= 2 and text.startswith("$") and text.endswith("$"):
        text = text[1:-1].strip()
    return text


def _last_user_content(messages: list[dict[str, str]]) -> str:
    for message in reversed(messages):
        if message["role"] == "user":
            return message["content"]
    return messages[-1]["content"] if messages else ""


def _get_path(row: Mapping[str, Any], dotted: str) -> tuple[bool, Any]:
    """Look up ``a.b.c`` in nested dicts; (found, value)."""
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return False, None
        value = value[part]
    return True, value


def _as_messages(value: Any) -> list[dict[str, str]] | None:
    """A raw problem string or a list of {role, content} messages -> messages; None if malformed."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, (list, tuple)) and value:
        messages = []
        for item in value:
            if not isinstance(item, Mapping):
                return None
            role, content = item.get("role"), item.get("content")
            if not isinstance(role, str) or not isinstance(content, str):
                return None
            messages.append({"role": role, "content": content})
        return messages
    return None


# --------------------------------------------------------------------------- column mapping

COLUMN_KEYS = ("problem", "answer", "dataSource")

# Tried in order; the first column present wins. AMC has both `question` and `problem` (same
# text), GSM8K only `question`.
_PROBLEM_CANDIDATES = ("problem", "question", "prompt", "query")
_ANSWER_CANDIDATES = ("answer", "ground_truth", "final_answer", "target")
_SOURCE_CANDIDATES = ("data_source", "source")


def resolve_columns(present: Iterable[str], overrides: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """Pick the source column for each of problem / answer / dataSource.

    DAPO row format (``prompt`` and ``reward_model`` present) maps to prompt /
    reward_model.ground_truth / data_source. Otherwise the first present candidate is used; when
    none is present the first candidate is kept so the error names the column a user expects.
    ``overrides`` (the run file's ``data.columns``; ``data_source`` accepted for ``dataSource``)
    win; nested fields use dots (``reward_model.ground_truth``).
    """
    names = set(present)
    if {"prompt", "reward_model"} <= names:
        mapping: dict[str, str | None] = {
            "problem": "prompt",
            "answer": "reward_model.ground_truth",
            "dataSource": "data_source" if "data_source" in names else None,
        }
    else:
        mapping = {
            "problem": next((c for c in _PROBLEM_CANDIDATES if c in names), _PROBLEM_CANDIDATES[0]),
            "answer": next((c for c in _ANSWER_CANDIDATES if c in names), _ANSWER_CANDIDATES[0]),
            "dataSource": next((c for c in _SOURCE_CANDIDATES if c in names), None),
        }
    for key, column in (overrides or {}).items():
        canonical = "dataSource" if key in ("data_source", "dataSource") else key
        if canonical not in COLUMN_KEYS:
            raise ValueError(f"data.columns: unknown key {key!r}; allowed keys are {', '.join(COLUMN_KEYS)}")
        if not isinstance(column, str) or not column:
            raise ValueError(f"data.columns.{canonical}: expected a column name, got {column!r}")
        mapping[canonical] = column
    return mapping


# --------------------------------------------------------------------------- reading files

SUPPORTED_SUFFIXES = (".parquet", ".jsonl")
_INVALID_JSON = "invalid JSON line"


def _read_parquet_rows(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        # A truncated upload or a file with a wrong suffix: say which file, not pyarrow's internals.
        raise ValueError(f"{path}: not a readable parquet file ({exc})") from None
    return table.to_pylist(), list(table.schema.names)


def _read_jsonl_rows(path: Path) -> tuple[list[dict[str, Any] | None], list[str]]:
    """Rows of a JSON-lines file; a line that is not a JSON object becomes None (a bad row)."""
    rows: list[dict[str, Any] | None] = []
    columns: dict[str, None] = {}
    with open(path, "rb") as handle:
        for raw in handle:
            if not raw.strip():
                continue  # blank lines (a trailing newline) are not rows
            try:
                # JSON text is UTF-8 (RFC 8259); ValueError also covers integers past Python's
                # digit limit, RecursionError a line of deeply nested brackets.
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError):
                row = None
            if not isinstance(row, dict):
                rows.append(None)
                continue
            rows.append(row)
            columns.update(dict.fromkeys(row))
    return rows, list(columns)


def _dataset_file(uri: str, cache_dir: str | Path | None) -> Path:
    """The local dataset file for ``uri``: s3:// is staged through ``dapo.storage`` (imported only
    then: local data must not need boto3); a local path must be an existing file; other schemes
    are refused with a message naming data.train / data.eval."""
    if uri.startswith("s3://"):
        from dapo import (
            storage,  # lazy: local use must not need boto3 or the storage module
        )

        return Path(storage.stage(uri, cache_dir=cache_dir))
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    elif re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", uri):
        raise ValueError(f"{uri}: unsupported URI scheme; use a local file path or an s3:// URI")
    path = Path(uri).expanduser()
    if path.is_dir():
        raise ValueError(f"{uri}: is a directory; data.train / data.eval must name one .parquet or .jsonl file")
    if not path.exists():
        raise FileNotFoundError(f"{uri}: no such file (data.train / data.eval must name an existing .parquet or .jsonl file)")
    return path


def _suffix_of(uri: str) -> str:
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    return "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""


def _file_stem(uri: str) -> str:
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[0] if "." in name else name


# --------------------------------------------------------------------------- the loader


def _char_length(messages: list[dict[str, str]]) -> int:
    return sum(len(m["content"]) for m in messages)


def load_prompts(
    uri: str | Path,
    *,
    template: Literal["dapo", "none"] = "dapo",
    columns: Mapping[str, str] | None = None,
    max_prompts: int | None = None,
    dedupe: bool = True,
    cache_dir: str | Path | None = None,
    max_prompt_length: int | None = None,
    prompt_length: Callable[[list[dict[str, str]]], int] | None = None,
) -> tuple[list[PromptRecord], LoadReport]:
    """Read a prompt set into records plus a report of what was dropped and why.

    Steps, in order: read rows (``.parquet`` via pyarrow, ``.jsonl`` line by line); map columns
    (``resolve_columns``); drop bad rows by reason; wrap raw problems in the DAPO template when
    ``template="dapo"`` (rows already wrapped are left alone); drop every copy of a prompt whose
    copies disagree on the answer (``conflict_key``); keep the first copy of each prompt when
    ``dedupe``; keep the first ``max_prompts``.

    ``max_prompt_length`` drops prompts longer than that, measured by ``prompt_length(messages)``
    (default: characters of all message contents; pass a tokenizer-based measure for tokens).

    Raises ValueError naming the file (and column) when nothing usable remains, and for an
    unsupported file type or URI scheme; FileNotFoundError for a missing local file.
    """
    uri = str(uri)
    if template not in ("dapo", "none"):
        raise ValueError(f"data.promptTemplate: expected 'dapo' or 'none', got {template!r}")
    if max_prompts is not None and max_prompts < 1:
        raise ValueError(f"max_prompts must be >= 1, got {max_prompts}")
    suffix = _suffix_of(uri)
    if suffix not in SUPPORTED_SUFFIXES:
        raise ValueError(
            f"{uri}: unsupported file type {suffix or '(no extension)'!r}; "
            "use .parquet (DAPO row format) or .jsonl (set data.columns for its column names)"
        )
    started = time.perf_counter()
    path = _dataset_file(uri, cache_dir)
    rows, present = _read_parquet_rows(path) if suffix == ".parquet" else _read_jsonl_rows(path)
    mapping = resolve_columns(present, columns)
    measure = prompt_length or _char_length
    default_source = _file_stem(uri)

    report = LoadReport(path=uri, rows_read=len(rows))
    bad: Counter[str] = Counter()
    candidates: list[tuple[str, PromptRecord]] = []
    for index, row in enumerate(rows):
        record, reason = _row_to_record(row, index, mapping, template, default_source, report)
        if record is not None and max_prompt_length is not None and measure(record.prompt) > max_prompt_length:
            record, reason = None, "too long"
        if record is None:
            bad[reason] += 1
        else:
            candidates.append((canonical_prompt_text(record.prompt), record))
    report.bad_rows = dict(bad)

    kept = _drop_conflicts_and_duplicates(candidates, dedupe, report)
    if max_prompts is not None and len(kept) > max_prompts:
        report.truncated = len(kept) - max_prompts
        kept = kept[:max_prompts]
    report.kept = len(kept)
    report.seconds = time.perf_counter() - started
    if not kept:
        raise ValueError(_no_usable_rows_message(uri, report, mapping))
    logger.info(report.summary())
    if report.conflicting_prompts_dropped:
        logger.warning(
            "%s: %d prompts carry different ground truths in different copies; all %d of their rows were dropped",
            uri, report.conflicting_prompts_dropped, report.conflicting_rows_dropped,
        )
    return kept, report


def _row_to_record(
    row: Mapping[str, Any] | None,
    index: int,
    mapping: Mapping[str, str | None],
    template: str,
    default_source: str,
    report: LoadReport,
) -> tuple[PromptRecord | None, str]:
    """One row -> (record, "") or (None, reason). Counts templating on ``report``."""
    if row is None:
        return None, _INVALID_JSON
    problem_column, answer_column = mapping["problem"], mapping["answer"]
    found, problem_value = _get_path(row, problem_column)
    if not found:
        return None, f"missing column {problem_column!r}"
    found, answer_value = _get_path(row, answer_column)
    if not found:
        return None, f"missing column {answer_column!r}"
    messages = _as_messages(problem_value)
    if messages is None:
        return None, "empty prompt" if problem_value in (None, "", [], ()) else "malformed prompt"
    if not _last_user_content(messages).strip():
        return None, "empty prompt"
    ground_truth = normalize_answer_value(answer_value)
    if ground_truth is None:
        return None, "empty answer" if answer_value is None else "unusable answer"
    if not ground_truth:
        return None, "empty answer"

    if template == "dapo":
        messages = _templated(messages, report)
    source_column = mapping.get("dataSource")
    data_source = default_source
    if source_column:
        found, value = _get_path(row, source_column)
        if found and isinstance(value, str) and value:
            data_source = value
    used = {problem_column.split(".")[0], answer_column.split(".")[0], source_column}
    extra = {key: value for key, value in row.items() if key not in used and not key.startswith("__")}
    if isinstance(answer_value, str) and _GSM8K_FINAL.search(answer_value):
        extra["answer_text"] = answer_value  # the worked solution GSM8K stores before "#### N"
    extra["row_index"] = index
    return PromptRecord(prompt_uid(messages), messages, ground_truth, data_source, extra), ""


def _templated(messages: list[dict[str, str]], report: LoadReport) -> list[dict[str, str]]:
    """Wrap the last user message in the DAPO template unless it already is."""
    position = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=len(messages) - 1)
    content = messages[position]["content"]
    if is_dapo_templated(content):
        report.already_templated += 1
        return messages
    report.templated += 1
    wrapped = list(messages)
    wrapped[position] = {"role": wrapped[position]["role"], "content": apply_dapo_template(content)}
    return wrapped


def _drop_conflicts_and_duplicates(
    keyed_records: list[tuple[str, PromptRecord]], dedupe: bool, report: LoadReport
) -> list[PromptRecord]:
    """Drop ALL copies of prompts whose copies disagree on the answer; then keep the first copy of each.

    Keyed on ``canonical_prompt_text`` of the final messages (after templating), so a raw copy and
    a pre-wrapped copy of the same problem count as the same prompt.
    """
    answers: dict[str, set[str]] = {}
    for key, record in keyed_records:
        answers.setdefault(key, set()).add(conflict_key(record.ground_truth))
    conflicting = {key for key, seen in answers.items() if len(seen) > 1}
    report.conflicting_prompts_dropped = len(conflicting)

    kept: list[PromptRecord] = []
    seen_keys: set[str] = set()
    for key, record in keyed_records:
        if key in conflicting:
            report.conflicting_rows_dropped += 1
        elif dedupe and key in seen_keys:
            report.duplicates_dropped += 1
        else:
            seen_keys.add(key)
            kept.append(record)
    return kept


def _no_usable_rows_message(uri: str, report: LoadReport, mapping: Mapping[str, str | None]) -> str:
    """Explain an empty result by its dominant cause, with the run-file setting that fixes it."""
    if report.rows_read == 0:
        return f"{uri}: no usable rows: the file holds no rows"
    if report.bad_rows:
        reason, count = max(report.bad_rows.items(), key=lambda item: item[1])
        scope = f"all {report.rows_read}" if count == report.rows_read else f"{count} of {report.rows_read}"
        match = re.fullmatch(r"missing column '(.+)'", reason)
        if match:
            column = match.group(1)
            key = next((k for k, v in mapping.items() if v == column), "problem")
            return f"{uri}: no usable rows: column {column!r} missing in {scope} rows; pass data.columns.{key}"
        hint = {
            "empty answer": f"check the answer column {mapping['answer']!r} (data.columns.answer)",
            "unusable answer": f"the answer column {mapping['answer']!r} must hold strings, numbers, lists or objects (data.columns.answer)",
            "empty prompt": f"check the problem column {mapping['problem']!r} (data.columns.problem)",
            "malformed prompt": f"column {mapping['problem']!r} must hold a string or a list of {{role, content}} messages (data.columns.problem)",
            "too long": "raise the prompt length limit (spec.rollout.maxPromptLength)",
            _INVALID_JSON: "each line must be one JSON object",
        }.get(reason, "")
        return f"{uri}: no usable rows: {reason} in {scope} rows" + (f"; {hint}" if hint else "")
    return (
        f"{uri}: no usable rows: all {report.conflicting_prompts_dropped} prompts have copies with "
        "different ground truths; fix the answers in the file"
    )


def load_run_prompts(spec, field: str, uri: str, max_prompts: int | None, tokenizer,
                     cache_dir: str | Path | None = None) -> list[PromptRecord]:
    """The prompts of a run's data set ``field`` ("train" or "eval") as every consumer of a run
    file loads them (the trainer, `dapo eval`): the run's template, columns and prompt-length
    limit in the policy's tokens. SpecError names ``spec.data.FIELD``."""
    return load_run_prompts_with_report(spec, field, uri, max_prompts, tokenizer, cache_dir)[0]


def load_run_prompts_with_report(spec, field: str, uri: str, max_prompts: int | None, tokenizer,
                                 cache_dir: str | Path | None = None) -> tuple[list[PromptRecord], LoadReport]:
    """:func:`load_run_prompts` and its :class:`LoadReport` (what `dapo check` prints). With
    ``tokenizer`` None the prompt-length limit is not applied (the caller says so)."""
    from dapo.rollout.base import encode_prompt
    from dapo.spec import SpecError

    data = spec.data
    length = {} if tokenizer is None else dict(
        max_prompt_length=spec.rollout.max_prompt_length,
        prompt_length=lambda messages: len(encode_prompt(tokenizer, messages)))
    try:
        # Eval sets are de-duplicated too: repeated copies (AIME's 32) would multiply eval.n.
        return load_prompts(uri, template=data.prompt_template, columns=data.columns, max_prompts=max_prompts,
                            cache_dir=cache_dir, **length)
    except (ValueError, OSError) as exc:
        raise SpecError(f"spec.data.{field}: {exc}") from None
