"""``s3t-delete``: exact unlearning of rows from an S3T composite, without a gradient step.

``model`` is a ``finetune`` step with ``slices:`` (an S3T composite, see ops/lib/s3t.py);
``rows`` lists the row ids to forget (positions in its training data from 0, or its
``id_field`` values), or ``rows_file`` names a file of them (``.txt`` one a line, ``.json``
a list, or ``.jsonl``/``.csv``/``.parquet`` records with the id in ``rows_field``).

In each sequence of a shard that holds a deleted row, the LoRA adapters from the position
of that row's slice onward saw it: they are deactivated and left out of the new composite,
whose shard then answers with its sequence of longest remaining prefix.  Other shards are
untouched (their files are shared).  The result equals a composite trained with the same
schedule and seed whose sequences stop before the deleted slices.  The manifest says which
shards, sequences and adapters were dropped and how many slices each affected shard keeps; a
shard that lost every sequence's first slice answers with the base model.  Row ids unknown to
the composite are an error; rows deleted before are noted and skipped.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator

from weightflow.dsl.lang.spec import DataPath, Kind, OpParams, OpSpec, StepRef
from weightflow.ops.lib.train_params import check_data_path

CompositeRef = Annotated[str, StepRef((Kind.COMPOSITE,))]


class S3TDeleteParams(OpParams):
    """The S3T composite and the rows to delete from it (``rows`` or ``rows_file``)."""

    model: CompositeRef = Field(description="the S3T composite (a finetune step with slices:)")
    rows: list[int | str] | None = Field(None, min_length=1, description="row ids to delete: positions in the "
                                         "training data (from 0) or id_field values")
    rows_file: DataPath | None = Field(None, description="a file of row ids (.txt one a line, .json a list, or "
                                       "records with rows_field)")
    rows_field: str = Field("id", description="the field holding the row id in a rows_file of records")

    @field_validator("rows_file")
    @classmethod
    def _file(cls, v):
        return check_data_path(v)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.rows is None) == (self.rows_file is None):
            raise ValueError("give the rows to delete as 'rows' (a list of ids) or 'rows_file' (a file of "
                             "them), exactly one of the two")
        return self


def run(inputs, params: S3TDeleteParams, ctx) -> dict:
    from pathlib import Path

    from weightflow.ops.lib import s3t

    src = Path(inputs["model"].path)
    requested: list[Any] = (list(params.rows) if params.rows is not None
                            else s3t.read_row_ids(ctx.data_path(params.rows_file), params.rows_field))
    if not requested:
        from weightflow.dsl.lang.diagnostics import OpError

        raise OpError(f"rows_file {params.rows_file}: no row ids in it")
    _, info = s3t.write_deleted(src, requested, ctx.out)
    ctx.info.update({"deletion": info})
    return {"rule": s3t.RULE, "deleted_from": inputs["model"].digest, "deleted_rows": info["deleted_rows"],
            "dropped_adapters": info["dropped_adapters"]}


OP = OpSpec[S3TDeleteParams](name="s3t-delete", version=1, output=Kind.COMPOSITE, params=S3TDeleteParams,
                             run=run, doc=__doc__)
