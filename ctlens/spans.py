"""Token spans: named groups of token positions that play the same role in every example.

A positional circuit (docs/circuits.md, "Positional circuits") scores each edge once per
span instead of summing over all positions. Prompts of different lengths line up through
their spans: span ``subject`` may be tokens 1-2 of one prompt and tokens 1-3 of another, and
its score is the sum over whichever positions carry that label, averaged over examples.

`ctlens.TaskData` stores spans as a small integer label per token (``spans``, ``[batch,
seq]``, an index into ``span_names``; `PADDING` on padding, which no span contains). This
module holds the rules for those labels and the two ways `TaskData.from_prompts` derives
them from text:

- character ranges: per prompt, ``{name: (start, end)}`` (or a list of ranges per name),
  half-open, in characters of the prompt string;
- a template with named slots, ``"when {io} and {s} went to the store , {s2} gave a drink
  {end}"``: each prompt must match it (literal text equal, each slot filled with at least one
  character); a slot's text is its span, and a name may fill several slots. A slot takes
  the shortest text that lets the rest of the template match, so only the last slot can
  absorb several words when nothing literal follows it.

A token belongs to a span when its characters (without the leading space that byte-level
BPE tokens carry) lie inside one of the span's ranges; a range that cuts a token is an
error, as is a range outside its prompt, one that holds no token, or two spans that
overlap. Tokens outside every named span, and special tokens such
as ``<bos>``, go to the span `OTHER`, which `TaskData.from_prompts` always lists last.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Bool, Float, Int

from ctlens.tokens import UnitError

OTHER = "other"
"""The span of every token outside the named spans (and of special tokens such as BOS)."""
PADDING = -1
"""The span label of padding positions: no span."""

CharRanges = Mapping[str, tuple[int, int] | Sequence[tuple[int, int]]]
"""One prompt's character spans: name -> ``(start, end)`` or a list of such ranges."""


def check_span_names(names: Any, what: str = "span_names") -> tuple[str, ...]:
    """``names`` as a tuple of distinct, non-empty strings, or a ValueError naming the fault."""
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"{what} must be a sequence of span names, got {names!r:.80}")
    names = tuple(names)
    if not names:
        raise ValueError(f"{what} is empty: a positional graph needs at least one span")
    for name in names:
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise ValueError(
                f"{what} holds {name!r}: span names are non-empty strings without "
                "surrounding spaces"
            )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{what} names {repeated} more than once; each span needs one name")
    return names


def check_span_labels(
    labels: Any,
    names: Any,
    attention_mask: Bool[torch.Tensor, "batch seq"],
) -> tuple[Int[torch.Tensor, "batch seq"], tuple[str, ...]]:
    """Validated ``(labels, names)``: labels long, `PADDING` on padding, every real token in
    a span ``0 .. len(names) - 1``; a clear error for anything else."""
    if names is None:
        raise ValueError(
            "spans were given without span_names: pass span_names=(...) naming each label "
            "0, 1, ... (or build the data with TaskData.from_prompts(..., spans=...))"
        )
    names = check_span_names(names)
    tensor = torch.as_tensor(labels, device=attention_mask.device)
    if tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
        raise TypeError(f"spans must hold integer span labels, got {tensor.dtype}")
    tensor = tensor.long()
    if tensor.shape != attention_mask.shape:
        raise ValueError(
            f"spans has shape {tuple(tensor.shape)}, expected {tuple(attention_mask.shape)} "
            "(one span label per token, like clean)"
        )
    outside = attention_mask & ((tensor < 0) | (tensor >= len(names)))
    if outside.any():
        row, col = (int(v) for v in outside.nonzero()[0])
        value = int(tensor[row, col])
        if value < 0:
            raise ValueError(
                f"the spans do not cover example {row}: its token {col} (of "
                f"{int(attention_mask[row].sum())} real tokens) has no span (label {value}); "
                f"give every real token a span, e.g. a catch-all {OTHER!r}"
            )
        raise ValueError(
            f"example {row}, token {col}: span label {value} is not one of the "
            f"{len(names)} spans {list(names)} (labels 0 .. {len(names) - 1})"
        )
    return tensor.masked_fill(~attention_mask, PADDING), names


def span_one_hot(
    labels: Int[torch.Tensor, "batch seq"], n_spans: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``[batch, seq, n_spans]``: 1 where a token is in a span, 0 on padding."""
    keep = labels >= 0
    out = torch.zeros((*labels.shape, n_spans), dtype=dtype, device=labels.device)
    out.scatter_(-1, labels.clamp(min=0)[..., None], keep[..., None].to(dtype))
    return out


# ---------------------------------------------------------------------- from text


def template_ranges(template: str, prompt: str, index: int) -> dict[str, list[tuple[int, int]]]:
    """The character ranges of ``template``'s named slots in ``prompt``; a ValueError naming
    the first place where ``prompt`` leaves the template."""
    parts = template_parts(template)
    pattern = "".join(
        re.escape(text) if kind == "text" else f"(?P<slot{k}>.+?)"
        for k, (kind, text) in enumerate(parts)
    )
    found = re.fullmatch(pattern, prompt, flags=re.DOTALL)
    if found is None:
        raise UnitError(index, _mismatch(parts, prompt, template))
    ranges: dict[str, list[tuple[int, int]]] = {}
    for k, (kind, name) in enumerate(parts):
        if kind == "slot":
            ranges.setdefault(name, []).append(found.span(f"slot{k}"))
    return ranges


def template_parts(template: str) -> list[tuple[str, str]]:
    """``template`` as ``("text", literal)`` and ``("slot", name)`` parts, in order."""
    if not isinstance(template, str):
        raise TypeError(f"template must be a string with named slots, got {template!r:.80}")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ValueError(f"template {template!r} is malformed ({err}); write slots as {{name}} "
                         "and literal braces as {{{{ }}}}") from None
    parts: list[tuple[str, str]] = []
    for literal, field, spec, conversion in parsed:
        if literal:
            parts.append(("text", literal))
        if field is None:
            continue
        if not field.strip() or spec or conversion:
            raise ValueError(
                f"template {template!r} has a slot {{{field}...}} that is not a plain name; "
                "write slots as {subject}, without conversions or format specs"
            )
        if parts and parts[-1][0] == "slot":
            raise ValueError(
                f"template {template!r}: slots {{{parts[-1][1]}}} and {{{field}}} touch; put "
                "literal text between two slots so that each prompt splits one way"
            )
        parts.append(("slot", field))
    if not any(kind == "slot" for kind, _ in parts):
        raise ValueError(f"template {template!r} has no named slot such as {{subject}}")
    return parts


def template_names(template: str) -> list[str]:
    """The slot names of ``template`` in order of first appearance."""
    names: list[str] = []
    for kind, text in template_parts(template):
        if kind == "slot" and text not in names:
            names.append(text)
    return names


def _mismatch(parts: list[tuple[str, str]], prompt: str, template: str) -> str:
    """Where ``prompt`` first leaves ``template`` (the longest prefix of parts that matches)."""
    end = 0
    for k in range(1, len(parts) + 1):
        pattern = "".join(
            re.escape(text) if kind == "text" else ".+?" for kind, text in parts[:k]
        )
        found = re.match(pattern, prompt, flags=re.DOTALL)
        if found is None:
            kind, text = parts[k - 1]
            wanted = f"the text {text!r}" if kind == "text" else f"text for the slot {{{text}}}"
            return (
                f"the prompt {prompt!r} does not match the template {template!r}: expected "
                f"{wanted} after character {end} ({prompt[end:end + 20]!r} follows)"
            )
        end = found.end()
    return (
        f"the prompt {prompt!r} does not match the template {template!r}: the template ends "
        f"at character {end} but the prompt goes on with {prompt[end:end + 20]!r}"
    )


def normalise_ranges(
    ranges: Any, prompt: str, index: int
) -> dict[str, list[tuple[int, int]]]:
    """``{name: [(start, end), ...]}`` from one prompt's character spans, each range checked
    to lie inside the prompt and to overlap no other span's range."""
    if not isinstance(ranges, Mapping):
        raise UnitError(
            index, f"spans must map span names to (start, end) character ranges, got "
            f"{ranges!r:.80}"
        )
    out: dict[str, list[tuple[int, int]]] = {}
    for name, value in ranges.items():
        try:
            check_span_names([name], "span name")
        except (TypeError, ValueError) as err:
            raise UnitError(index, str(err)) from None
        items = [value] if _is_range(value) else value
        if not isinstance(items, Sequence) or not all(_is_range(r) for r in items):
            raise UnitError(
                index, f"span {name!r} must be (start, end) or a list of them, got {value!r:.80}"
            )
        for start, end in items:
            if not 0 <= start < end <= len(prompt):
                raise UnitError(
                    index, f"span {name!r} is characters {start}-{end} but the prompt "
                    f"{prompt!r} has {len(prompt)}: a span must be a non-empty range inside "
                    "its prompt"
                )
        out[name] = [(int(s), int(e)) for s, e in items]
    flat = sorted((s, e, name) for name, items in out.items() for s, e in items)
    for (s1, e1, n1), (s2, e2, n2) in zip(flat, flat[1:], strict=False):
        if s2 < e1:
            raise UnitError(
                index, f"spans {n1!r} ({s1}-{e1}) and {n2!r} ({s2}-{e2}) overlap; each "
                "character belongs to at most one span"
            )
    return out


def _is_range(value: Any) -> bool:
    return (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    )


def token_labels(
    offsets: Sequence[tuple[int, int]],
    ranges: dict[str, list[tuple[int, int]]],
    names: Sequence[str],
    prompt: str,
    index: int,
) -> list[int]:
    """One span label per token (an index into ``names``) from the tokens' character
    ``offsets``; tokens in no range get `OTHER`'s label."""
    lookup = {name: k for k, name in enumerate(names)}
    labels = [lookup[OTHER]] * len(offsets)
    covered = {(name, r): False for name, items in ranges.items() for r in items}
    for t, (a, b) in enumerate(offsets):
        text = prompt[a:b]
        if not text.strip():  # a special token (BOS, EOS) or whitespace: in a span or other
            inside = [n for n, items in ranges.items() if any(s <= a and b <= e for s, e in items)]
            labels[t] = lookup[inside[0]] if inside and a < b else labels[t]
            continue
        # byte-level BPE tokens carry their leading space (" John"): only the word counts
        a += len(text) - len(text.lstrip())
        b -= len(text) - len(text.rstrip())
        for name, items in ranges.items():
            for s, e in items:
                if max(a, s) >= min(b, e):
                    continue
                if a < s or b > e:
                    raise UnitError(
                        index, f"span {name!r} (characters {s}-{e}, {prompt[s:e]!r}) cuts the "
                        f"token {prompt[a:b]!r} (characters {a}-{b}); move the boundary to "
                        "where one token ends and the next begins"
                    )
                labels[t] = lookup[name]
                covered[(name, (s, e))] = True
    for (name, (s, e)), hit in covered.items():
        if not hit:
            raise UnitError(
                index, f"span {name!r} (characters {s}-{e}, {prompt[s:e]!r}) holds no token "
                "of the prompt"
            )
    return labels


def names_from_ranges(per_prompt: Sequence[dict[str, list[tuple[int, int]]]]) -> tuple[str, ...]:
    """Span names in order of first appearance, then `OTHER` (unless already named)."""
    names: list[str] = []
    for ranges in per_prompt:
        names += [name for name in ranges if name not in names]
    return (*names, *(() if OTHER in names else (OTHER,)))


def prompt_span_labels(
    tokenizer: Any,
    prompts: Sequence[str],
    token_ids: Sequence[list[int]],
    spans: Sequence[CharRanges] | None,
    template: str | None,
) -> tuple[list[list[int]], tuple[str, ...]]:
    """Per prompt, one span label per token (of ``token_ids``, the prompts' tokens), and the
    span names: from character ``spans`` or a ``template`` (module docstring)."""
    if spans is not None and template is not None:
        raise ValueError("pass spans=... (character ranges) or template=..., not both")
    if template is not None:
        names = template_names(template)
        ranges = [template_ranges(template, p, i) for i, p in enumerate(prompts)]
        names = [*names, *(() if OTHER in names else (OTHER,))]
    else:
        assert spans is not None
        if isinstance(spans, (str, Mapping)) or len(spans) != len(prompts):
            got = len(spans) if isinstance(spans, Sequence) else type(spans).__name__
            raise ValueError(
                f"{len(prompts)} prompts but {got} span mappings: give one {{name: (start, "
                "end)}} per prompt"
            )
        ranges = [normalise_ranges(r, p, i) for i, (r, p) in enumerate(zip(spans, prompts,
                                                                               strict=True))]
        names = list(names_from_ranges(ranges))
    labels = []
    for i, (prompt, ids) in enumerate(zip(prompts, token_ids, strict=True)):
        offsets = _offsets(tokenizer, prompt, ids, i)
        labels.append(token_labels(offsets, ranges[i], names, prompt, i))
    return labels, tuple(names)


def _offsets(tokenizer: Any, prompt: str, ids: list[int], index: int) -> list[tuple[int, int]]:
    """Each token's character range in ``prompt`` (special tokens: an empty range)."""
    try:
        encoded = tokenizer(prompt, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):
        raise ValueError(
            "spans from text need the tokens' character offsets, which this tokenizer does "
            "not report; use a fast (Rust-backed) tokenizer or pass span labels as a tensor"
        ) from None
    if list(encoded["input_ids"]) != list(ids):
        raise UnitError(index, "the tokenizer gave other tokens when asked for offsets")
    return [(int(a), int(b)) for a, b in encoded["offset_mapping"]]


# ---------------------------------------------------------------------- products per span


class SpanOrder:
    """A batch's token cells ``(example, position)`` grouped by span, for products per span.

    ``perm`` lists the flat cells ``b * pos + t`` span by span (each span's cells in their
    batch order), padding (no span) left out; span ``k``'s cells are
    ``perm[bounds[k]:bounds[k + 1]]``. A tensor whose cell axis is sorted by `sort_rows_`
    gives each span a contiguous block, so a sum over a span's cells is one matrix product
    on a view: positional EAP costs the same multiply-adds as position-free EAP (each cell
    is in one span), in ``n_spans`` products instead of one.
    """

    def __init__(self, labels: Int[torch.Tensor, "batch pos"], n_spans: int) -> None:
        flat = labels.reshape(-1)
        kept = (flat >= 0).nonzero()[:, 0]
        order = torch.sort(flat[kept], stable=True).indices
        self.perm = kept[order]
        counts = torch.bincount(flat[kept], minlength=n_spans).tolist()
        bounds = [0]
        for count in counts:
            bounds.append(bounds[-1] + count)
        self.bounds = tuple(bounds)
        self.n_spans = n_spans
        self.n_cells = flat.numel()
        self.shape: tuple[int, int] = (int(labels.shape[0]), int(labels.shape[1]))
        self.labels = labels

    def sort_rows_(self, buffer: Float[torch.Tensor, "rows batch pos d"]) -> None:
        """Reorder the cells of every row of ``buffer`` in place to `perm`'s order (padding
        cells moved to the end), one row at a time (one row of scratch memory)."""
        rows, d = buffer.shape[0], buffer.shape[-1]
        cells = buffer.view(rows, self.n_cells, d)
        order = self.full_order(buffer.device)
        for row in range(rows):
            cells[row].copy_(cells[row].index_select(0, order))

    def unsort(self, row: Float[torch.Tensor, "batch pos d"]) -> torch.Tensor:
        """One row sorted by `sort_rows_`, back in ``(batch, pos)`` order."""
        out = torch.empty_like(row)
        out.view(self.n_cells, -1)[self.full_order(row.device)] = row.reshape(self.n_cells, -1)
        return out

    def full_order(self, device: torch.device) -> torch.Tensor:
        """`perm`, then the padding cells: a permutation of every cell."""
        rest = torch.ones(self.n_cells, dtype=torch.bool, device=self.perm.device)
        rest[self.perm] = False
        return torch.cat([self.perm, rest.nonzero()[:, 0]]).to(device)

    def products(
        self,
        rows: Float[torch.Tensor, "n cells d"],
        grads: Float[torch.Tensor, "w cells d"],
    ) -> Float[torch.Tensor, "n w n_spans"]:
        """``out[i, j, k] = sum over span k's cells of rows[i, c] . grads[j, c]``, with both
        tensors' cell axes already in sorted order (`sort_rows_`; ``grads`` through
        `sorted_cells`)."""
        n, w = rows.shape[0], grads.shape[0]
        out = rows.new_zeros((n, w, self.n_spans), dtype=torch.float32)
        for k in range(self.n_spans):
            lo, hi = self.bounds[k], self.bounds[k + 1]
            if hi > lo:
                out[:, :, k] = (rows[:, lo:hi].reshape(n, -1).float()
                                @ grads[:, lo:hi].reshape(w, -1).float().T)
        return out

    def sorted_cells(self, tensor: Float[torch.Tensor, "w batch pos d"]) -> torch.Tensor:
        """``[w, kept cells, d]``: ``tensor``'s cells in `perm`'s order (a copy)."""
        w, d = tensor.shape[0], tensor.shape[-1]
        return tensor.reshape(w, self.n_cells, d)[:, self.perm.to(tensor.device)]

    def natural(
        self, cells: Float[torch.Tensor, "w kept d"]
    ) -> Float[torch.Tensor, "w batch pos d"]:
        """Cells in `perm`'s order (`sorted_cells`) back in ``(batch, pos)`` order; padding 0."""
        w, d = cells.shape[0], cells.shape[-1]
        out = cells.new_zeros(w, self.n_cells, d)
        out[:, self.perm.to(cells.device)] = cells
        return out.view(w, *self.shape, d)

    def combine(
        self, coefs: Float[torch.Tensor, "n_spans c n"], rows: Float[torch.Tensor, "n kept d"]
    ) -> Float[torch.Tensor, "c kept d"]:
        """Each span's cells of ``rows`` (in `perm`'s order) mixed by that span's
        coefficients: ``out[:, cells of k] = coefs[k] @ rows[:, cells of k]``."""
        n, kept, d = rows.shape
        out = rows.new_zeros(coefs.shape[1], kept, d)
        for k in range(self.n_spans):
            lo, hi = self.bounds[k], self.bounds[k + 1]
            if hi > lo:
                block = rows[:, lo:hi].reshape(n, (hi - lo) * d)
                out[:, lo:hi] = (coefs[k] @ block).view(-1, hi - lo, d)
        return out
