"""Vocabulary surgery: merging models whose tokenizers differ, row by token string.

A merge step's ``tokenizer: {source: union | base | STEP}`` chooses the merged model's
vocabulary (mergekit's ``tokenizer_source``):

- ``base``: the base model's tokenizer (the step's ``base:``, else its first model);
- ``union``: the base's tokens with their ids, then every other model's tokens that the
  base lacks, model by model in the order the step names them, each model's in id order
  (deterministic, where mergekit's order follows a hash map);
- ``STEP``: the tokenizer of that model step, as it is (``union`` and ``base`` are always
  the keywords, even where a step has that name).

Every input checkpoint is then seen through a ``VocabView``: its embedding and output-head
tensors (``VOCAB_TENSOR``) have one row per token of the chosen vocabulary, the row of a
token the model knows read from its own row for that token string, so the method merges
row ``i`` of every model as the same token, and streaming stays tensor by tensor in row
chunks.  A token a model lacks gets, in that model's view (mergekit's rule):

- the base's row for it, when the method has a ``base:`` and the base knows the token;
- else the mean of the rows of the models of the step that know it (one model: its row);
- else the row of the ``tokenizer.source`` model when it knows it (a model the step does
  not merge otherwise); else zero.

Rows past the tokenizer's tokens (padding of a ``base``/``STEP`` source whose embedding
has more rows than tokens) keep a model's own padding row at that index, else zero.

A Delta has the rows of the base it was taken against (``extract-delta`` takes equal
shapes), so it is read in that base's vocabulary, found among the step's models by the
delta's recorded base digest; a token that base lacks gets a zero delta (a task vector
says nothing about a token its model never had), so the merged row is the base's row as
chosen above.

The merged directory ships the chosen tokenizer (the source's files; a union is saved
from the base's tokenizer with the tokens added) and config.json's ``vocab_size`` (and
``bos/eos/pad_token_id``, mapped by token string).  ``tokenizer:`` unset changes nothing.
Tokenizers are read with transformers' ``AutoTokenizer`` (never remote code).
"""

from __future__ import annotations

import json
import re
import shutil
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag

from weightflow.dsl.lang.spec import ModelRef, OpParams

# -- params (torch-free) -------------------------------------------------------------------

#: The keywords of ``tokenizer.source``; anything else names a model step.
BUILT_SOURCES = ("union", "base")


class TokenizerBuilt(OpParams):
    """The merged vocabulary built from the step's own models."""

    source: Literal["union", "base"] = Field(description="'union' of every model's tokens (base first), "
                                                         "or the 'base' model's tokenizer")


class TokenizerOfStep(OpParams):
    """The merged vocabulary is that of another model step's tokenizer."""

    source: ModelRef = Field(description="step whose tokenizer the merged model ships")


def _tokenizer_kind(value: Any) -> str:
    source = value.get("source") if isinstance(value, dict) else getattr(value, "source", None)
    return "built" if source in BUILT_SOURCES or not isinstance(value, dict | OpParams) else "step"


# A keyword is never taken for a step name, and a bad value gets the errors of one shape only.
TokenizerChoice = Annotated[
    Union[Annotated[TokenizerBuilt, Tag("built")], Annotated[TokenizerOfStep, Tag("step")]],  # noqa: UP007
    Discriminator(_tokenizer_kind),
]


def any_of_schema(schema: dict) -> None:
    """JSON Schema of a ``TokenizerChoice`` field: ``anyOf`` for pydantic's ``oneOf`` (a keyword
    such as 'base' matches both shapes, so ``oneOf`` would refuse it in an editor)."""
    for sub in schema.get("anyOf", []):
        if "oneOf" in sub:
            sub["anyOf"] = sub.pop("oneOf")
    if "oneOf" in schema:
        schema["anyOf"] = schema.pop("oneOf")


# -- which tensors have a vocabulary axis (axis 0) -----------------------------------------

#: Input embeddings (their row count is a checkpoint's vocabulary size) ...
EMBEDDING_TENSOR = re.compile(r"(^|\.)(embed_tokens|word_embeddings|wte|embed_in)\.weight$")
#: ... and every tensor indexed by token id on axis 0: embeddings, output heads, MLM decoders.
VOCAB_TENSOR = re.compile(
    r"(^|\.)(embed_tokens|word_embeddings|wte|embed_in|embed_out|lm_head)\.weight$"
    r"|^output\.weight$|(^|\.)lm_head\.bias$|(^|\.)predictions\.(decoder\.weight|decoder\.bias|bias)$"
)
#: Files of a tokenizer: removed from the merged directory before the chosen one is written.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json")
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def vocab_rows(ckpt) -> int | None:
    """A checkpoint's vocabulary size: the rows of its input embedding (else of its head)."""
    found = [n for n in ckpt.names() if EMBEDDING_TENSOR.search(n)] or \
            [n for n in ckpt.names() if VOCAB_TENSOR.search(n)]
    return ckpt.info[found[0]].shape[0] if found and ckpt.info[found[0]].shape else None


def vocab_tensors(ckpt) -> list[str]:
    """The float tensors of ``ckpt`` indexed by token id on axis 0."""
    rows = vocab_rows(ckpt)
    return [n for n in ckpt.names() if VOCAB_TENSOR.search(n) and ckpt.is_float(n)
            and ckpt.info[n].shape and ckpt.info[n].shape[0] == rows]


# -- reading and building tokenizers -------------------------------------------------------

def has_tokenizer(directory: Path) -> bool:
    return any((Path(directory) / f).is_file() for f in TOKENIZER_FILES if f not in ("chat_template.jinja",
                                                                                     "chat_template.json"))


def load_tokenizer(directory: Path, label: str):
    """The (fast) tokenizer saved in ``directory``; OpError when it cannot be read."""
    import transformers

    from weightflow.dsl.lang.diagnostics import OpError

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False, use_fast=True)
    except Exception as exc:  # transformers raises many kinds here; all mean "unreadable"
        raise OpError(f"cannot read the tokenizer of {label}: {type(exc).__name__}: {exc}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)


def build_union(base_tok, others: list) -> Any:
    """``base_tok`` (a fresh copy) plus every token of ``others`` it lacks, in model order and
    id order; a token that is an added (special) token of its model keeps its flags."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:  # a copy: never mutate the base's tokenizer
        base_tok.save_pretrained(tmp)
        out = load_tokenizer(Path(tmp), "the union tokenizer")
    known = set(out.get_vocab())
    for tok in others:
        added = {info.content: info for info in tok.added_tokens_decoder.values()}
        for token, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if token in known:
                continue
            known.add(token)
            info = added.get(token)
            if info is not None:
                out.add_tokens([info], special_tokens=bool(info.special))
            else:
                out.add_tokens([token])
    return out


def id_order(vocab: dict[str, int]) -> list[str | None]:
    """Token string per id (None at ids no token has)."""
    out: list[str | None] = [None] * (max(vocab.values(), default=-1) + 1)
    for token, i in vocab.items():
        out[i] = token
    return out


# -- reading rows ---------------------------------------------------------------------------

MAX_GAP = 16  # rows read through rather than split into another read
FILL_CACHE_CHUNKS = 8  # chunks of default rows kept: at most 8 x 4 MB (CHUNK_ELEMENTS floats each)


def gather_rows(ckpt, name: str, rows: list[int]):
    """Rows ``rows`` (any order, repeats allowed) of tensor ``name``, in that order, read as
    few contiguous runs (gaps up to MAX_GAP rows are read through)."""
    import torch

    info = ckpt.info[name]
    if not rows:
        return torch.empty((0,) + tuple(info.shape[1:]), dtype=ckpt.get(name, 0, 0).dtype)
    wanted = sorted(set(rows))
    runs: list[list[int]] = [[wanted[0], wanted[0] + 1]]
    for r in wanted[1:]:
        if r - runs[-1][1] <= MAX_GAP:
            runs[-1][1] = r + 1
        else:
            runs.append([r, r + 1])
    parts, where = [], {}
    offset = 0
    for lo, hi in runs:
        parts.append(ckpt.get(name, lo, hi))
        for r in range(lo, hi):
            where[r] = offset + r - lo
        offset += hi - lo
    block = torch.cat(parts) if len(parts) > 1 else parts[0]
    return block[torch.tensor([where[r] for r in rows], dtype=torch.long)]


class VocabView:
    """A checkpoint as the merge sees it: vocabulary tensors in the chosen vocabulary.

    ``source_row[i]`` is the row of this checkpoint holding output row ``i`` (-1: the
    checkpoint lacks that token); missing rows come from ``fill(name, lo, hi)`` (the
    surgery's default rows) or are zero.
    """

    def __init__(self, ckpt, source_row: list[int], rows: int, fill=None):
        from weightflow.ops.lib.tensors import TensorInfo

        self.ckpt = ckpt
        self.label = ckpt.label
        self.dir = ckpt.dir
        self.source_row = source_row
        self.fill = fill
        self.vocab_names = set(vocab_tensors(ckpt))
        self.info = {n: TensorInfo(n, i.dtype, (rows,) + tuple(i.shape[1:])) if n in self.vocab_names else i
                     for n, i in ckpt.info.items()}

    def names(self) -> list[str]:
        return list(self.info)

    def __contains__(self, name: str) -> bool:
        return name in self.info

    def is_float(self, name: str) -> bool:
        return self.ckpt.is_float(name)

    def is_sparse(self, name: str) -> bool:
        return self.ckpt.is_sparse(name)

    def file_of(self, name: str) -> Path:
        return self.ckpt.file_of(name)

    def close(self) -> None:
        self.ckpt.close()

    def __getattr__(self, attr: str):
        """Anything else a checkpoint offers (how a tensor is stored, ...), from the checkpoint."""
        if attr == "ckpt":
            raise AttributeError(attr)
        return getattr(self.ckpt, attr)

    def get(self, name: str, start: int | None = None, stop: int | None = None):
        import torch

        if name not in self.vocab_names:
            return self.ckpt.get(name, start, stop)
        shape = self.info[name].shape
        start = 0 if start is None else start
        stop = shape[0] if stop is None else stop
        wanted = self.source_row[start:stop]
        have = [i for i, r in enumerate(wanted) if r >= 0]
        rows = gather_rows(self.ckpt, name, [wanted[i] for i in have])
        out = torch.zeros((stop - start,) + tuple(shape[1:]), dtype=rows.dtype)
        if have:
            out[torch.tensor(have, dtype=torch.long)] = rows
        if self.fill is not None and len(have) < stop - start:
            missing = torch.tensor([i for i, r in enumerate(wanted) if r < 0], dtype=torch.long)
            out[missing] = self.fill(name, start, stop)[missing].to(out.dtype)
        return out


# -- one merge step's surgery --------------------------------------------------------------

class _Member:
    """One model the step reads: its artifact, checkpoint and vocabulary."""

    def __init__(self, art, vocab: dict[str, int] | None, rows: int | None, ckpt):
        self.art, self.vocab, self.rows, self.ckpt = art, vocab, rows, ckpt


class VocabSurgery:
    """The chosen vocabulary of one merge step and the views of its inputs (module docstring)."""

    def __init__(self, inputs, params, ctx):
        from weightflow.dsl.lang.diagnostics import OpError
        from weightflow.dsl.lang.spec import Kind
        from weightflow.ops.lib.tensors import Checkpoint

        self.ctx = ctx
        choice = params.tokenizer
        paths = list(inputs.paths().items())
        source_path = ("tokenizer", "source")
        model_arts = [a for p, a in paths if a.kind == Kind.MODEL and tuple(p) != source_path]
        self.has_base = "base" in inputs and inputs["base"].kind == Kind.MODEL
        base_art = inputs["base"] if self.has_base else (model_arts[0] if model_arts else None)
        if base_art is None:
            raise OpError("tokenizer: needs at least one model in the step")
        ordered = [base_art] + [a for a in model_arts if a.digest != base_art.digest]
        self.members: list[_Member] = []
        seen: set[str] = set()
        for art in ordered:
            if art.digest in seen:
                continue
            seen.add(art.digest)
            ckpt = Checkpoint(art.path, label=f"model '{art.step}'")
            self.members.append(_Member(art, None, vocab_rows(ckpt), ckpt))
        self.source_member: _Member | None = None
        if isinstance(choice, TokenizerOfStep):
            art = inputs.at(source_path)
            known = next((m for m in self.members if m.art.digest == art.digest), None)
            if known is None:
                ckpt = Checkpoint(art.path, label=f"model '{art.step}'")
                known = _Member(art, None, vocab_rows(ckpt), ckpt)
                self.source_member = known
            source = known
        else:
            source = self.members[0]
        self._tokenizers: dict[str, Any] = {}
        for m in self.members + ([self.source_member] if self.source_member else []):
            m.vocab = self._vocab_of(m, base=self.members[0])
        if isinstance(choice, TokenizerBuilt) and choice.source == "union":
            self.tokenizer = build_union(self._tokenizer(self.members[0]),
                                         [self._tokenizer(m) for m in self.members[1:]
                                          if self._tokenizer(m) is not None])
            self.source_dir: Path | None = None
        else:
            self.tokenizer = self._tokenizer(source)
            if self.tokenizer is None:
                raise OpError(f"tokenizer: model '{source.art.step}' has no tokenizer files")
            self.source_dir = source.art.path
        self.vocab: dict[str, int] = dict(self.tokenizer.get_vocab())
        self.tokens = id_order(self.vocab)
        n_ids = len(self.tokens)
        padded = source.rows if self.source_dir is not None and source.rows else 0
        self.rows = max(n_ids, padded)
        self.source = source
        self._maps: dict[str, list[int]] = {}
        self._donors: list[list[tuple[int, int]] | None] | None = None
        # default rows of recent chunks: every model's view of a chunk needs the same ones, and
        # a parallel merge asks for several chunks at once
        self._fill_cache: OrderedDict[tuple, Any] = OrderedDict()
        self._fill_lock = threading.Lock()
        ctx.info["vocab_size"] = self.rows
        for m in self.members:
            added = sum(1 for t in self.vocab if t not in (m.vocab or {}))
            if added:
                ctx.log(f"model '{m.art.step}': {added} of {len(self.vocab)} tokens of the merged vocabulary "
                        "are not in its tokenizer (rows from the rule in weightflow.ops.lib.vocab)")

    # -- vocabularies
    def _tokenizer(self, m: _Member):
        if m.art.digest not in self._tokenizers:
            path = Path(m.art.path)
            self._tokenizers[m.art.digest] = (load_tokenizer(path, f"model '{m.art.step}'")
                                              if has_tokenizer(path) else None)
        return self._tokenizers[m.art.digest]

    def _vocab_of(self, m: _Member, base: _Member) -> dict[str, int]:
        from weightflow.dsl.lang.diagnostics import OpError

        tok = self._tokenizer(m)
        if tok is not None:
            return dict(tok.get_vocab())
        if m is not base and base.vocab is not None and m.rows == base.rows:
            self.ctx.warn(f"model '{m.art.step}' has no tokenizer files: taking it to have the tokenizer of "
                          f"'{base.art.step}' (its embedding has as many rows)")
            return base.vocab
        raise OpError(f"tokenizer: model '{m.art.step}' has no tokenizer files, so its rows cannot be matched "
                      "to tokens (save its tokenizer with it)")

    def _source_rows(self, vocab: dict[str, int], rows: int | None, padding: bool) -> list[int]:
        """Output row -> row of a checkpoint with ``vocab`` and ``rows`` rows (-1: none)."""
        rows = rows or 0
        out = []
        own_ids = set(vocab.values()) if padding else set()
        for i in range(self.rows):
            token = self.tokens[i] if i < len(self.tokens) else None
            if token is not None:
                r = vocab.get(token, -1)
                out.append(r if 0 <= r < rows else -1)
            else:  # padding: a model's own padding row at that index
                out.append(i if padding and i < rows and i not in own_ids else -1)
        return out

    def _map_of(self, m: _Member) -> list[int]:
        key = m.art.digest
        if key not in self._maps:
            self._maps[key] = self._source_rows(m.vocab or {}, m.rows, padding=True)
        return self._maps[key]

    def _donor_table(self) -> list[list[tuple[int, int]] | None]:
        """Per output row: (member index, its row) whose mean fills a model lacking it;
        None where every member has it.  Index len(members) is the tokenizer source."""
        if self._donors is None:
            maps = [self._map_of(m) for m in self.members]
            source_map = self._map_of(self.source_member) if self.source_member else None
            table: list[list[tuple[int, int]] | None] = []
            for i in range(self.rows):
                have = [(k, mp[i]) for k, mp in enumerate(maps) if mp[i] >= 0]
                if len(have) == len(maps):
                    table.append(None)
                elif self.has_base and maps[0][i] >= 0:
                    table.append([have[0]])
                elif have:
                    table.append(have)
                elif source_map is not None and source_map[i] >= 0:
                    table.append([(len(maps), source_map[i])])
                else:
                    table.append([])
            self._donors = table
        return self._donors

    def _fill(self, name: str, lo: int, hi: int):
        """Default rows lo:hi of tensor ``name`` (float32; zero where no donor has the token)."""
        import torch

        key = (name, lo, hi)
        with self._fill_lock:
            if key in self._fill_cache:
                return self._fill_cache[key]
        table = self._donor_table()[lo:hi]
        ckpts = [m.ckpt for m in self.members] + ([self.source_member.ckpt] if self.source_member else [])
        tail = tuple(self.members[0].ckpt.info[name].shape[1:]) if name in self.members[0].ckpt else None
        out = None
        for k, ckpt in enumerate(ckpts):
            pos = [(j, r, len(d)) for j, d in enumerate(table) if d for kk, r in d if kk == k]
            if not pos or name not in ckpt or (tail is not None and tuple(ckpt.info[name].shape[1:]) != tail):
                continue
            rows = gather_rows(ckpt, name, [r for _, r, _ in pos]).to(torch.float32)
            if out is None:
                out = torch.zeros((hi - lo,) + tuple(rows.shape[1:]), dtype=torch.float32)
            weights = torch.tensor([1.0 / n for _, _, n in pos], dtype=torch.float32)
            out.index_add_(0, torch.tensor([j for j, _, _ in pos], dtype=torch.long),
                           rows * weights.reshape((-1,) + (1,) * (rows.dim() - 1)))
        if out is None:
            shape = tail if tail is not None else tuple(ckpts[0].info[name].shape[1:])
            out = torch.zeros((hi - lo,) + shape, dtype=torch.float32)
        with self._fill_lock:
            self._fill_cache[key] = out
            while len(self._fill_cache) > FILL_CACHE_CHUNKS:
                self._fill_cache.popitem(last=False)
        return out

    # -- views
    def view(self, ckpt, art):
        """``ckpt`` (of input ``art``) in the chosen vocabulary."""
        from weightflow.dsl.lang.diagnostics import OpError
        from weightflow.dsl.lang.spec import Kind

        if art.kind == Kind.DELTA:
            taken = art.meta.get("base")
            owner = next((m for m in self.members + ([self.source_member] if self.source_member else [])
                          if m.art.digest == taken), None)
            if owner is None:
                raise OpError(f"tokenizer: delta '{art.step}' was taken against a base that is not a model of "
                              "this step, so its rows cannot be matched to tokens; merge it onto the base it "
                              "was taken against, or name that base as tokenizer.source")
            return VocabView(ckpt, self._source_rows(owner.vocab or {}, vocab_rows(ckpt), padding=False),
                             self.rows)
        member = next((m for m in self.members if m.art.digest == art.digest), None)
        if member is None:
            raise OpError(f"tokenizer: model '{art.step}' is not an input of this step")
        return VocabView(ckpt, self._map_of(member), self.rows, fill=self._fill)

    # -- the merged directory
    def write(self, out: Path) -> None:
        """Replace the tokenizer files copied with the template by the chosen tokenizer and set
        config.json's vocab_size (and special token ids, by token string)."""
        from weightflow.dsl.lang.diagnostics import OpError
        from weightflow.ops.lib.tensors import Checkpoint, write_config

        out = Path(out)
        written = Checkpoint(out, label="the merged model")
        wrong = [n for n in vocab_tensors(written) if written.info[n].shape[0] != self.rows]
        rows = vocab_rows(written)
        written.close()
        if wrong or rows != self.rows:  # a method that read its inputs without open_models / vocab.view
            raise OpError(f"tokenizer: this merge method does not read its inputs through the vocabulary "
                          f"views: the merged embedding has {rows} rows, the chosen vocabulary {self.rows}")
        for f in TOKENIZER_FILES:
            (out / f).unlink(missing_ok=True)
        if self.source_dir is not None:
            for f in TOKENIZER_FILES:
                if (self.source_dir / f).is_file():
                    shutil.copyfile(self.source_dir / f, out / f)
        else:
            self.tokenizer.save_pretrained(str(out))
        config_vocab = self.members[0].vocab or {}
        names = id_order(config_vocab)
        cfg_path = out / "config.json"
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text())
            cfg["vocab_size"] = self.rows
            self._remap_ids(cfg, names)
            write_config(out, cfg, cfg.get("torch_dtype") or cfg.get("dtype") or self.ctx.dtype)
        gen_path = out / "generation_config.json"
        if gen_path.is_file():
            gen = json.loads(gen_path.read_text())
            if self._remap_ids(gen, names):
                gen_path.write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")

    def _remap_ids(self, cfg: dict, names: list[str | None]) -> bool:
        changed = False
        for key in TOKEN_ID_KEYS:
            value = cfg.get(key)
            listed = value if isinstance(value, list) else [value]
            ids = [i for i in listed if isinstance(i, int) and not isinstance(i, bool)]
            if not ids or len(ids) != len(listed):
                continue
            new = []
            for i in ids:
                token = names[i] if 0 <= i < len(names) else None
                if token is None or token not in self.vocab:
                    self.ctx.warn(f"config {key}={i}: token {token!r} is not in the merged vocabulary; kept")
                    new.append(i)
                else:
                    new.append(self.vocab[token])
            new_value: Any = new if isinstance(value, list) else new[0]
            if new_value != value:
                cfg[key] = new_value
                changed = True
        return changed

    def close(self) -> None:
        for m in self.members + ([self.source_member] if self.source_member else []):
            m.ckpt.close()


_ACTIVE: ContextVar[VocabSurgery | None] = ContextVar("weightflow_vocab_surgery", default=None)


@contextmanager
def surgery(inputs, params, ctx) -> Iterator[VocabSurgery | None]:
    """While a merge step with ``tokenizer:`` runs, ``view`` maps its checkpoints into the
    chosen vocabulary; when it has written its tensors, the chosen tokenizer is written
    beside them.  Without ``tokenizer:`` this does nothing."""
    if getattr(params, "tokenizer", None) is None:
        yield None
        return
    active = VocabSurgery(inputs, params, ctx)
    token = _ACTIVE.set(active)
    try:
        yield active
    finally:
        _ACTIVE.reset(token)
        active.close()
    active.write(ctx.out)


def view(ckpt, art):
    """``ckpt`` in the vocabulary of the running merge's ``tokenizer:`` (itself when unset)."""
    active = _ACTIVE.get()
    return ckpt if active is None else active.view(ckpt, art)
