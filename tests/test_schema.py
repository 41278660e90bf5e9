"""Schema agreement: the coordinator announces features and classes, a site whose data differs refuses in one line.

Real tables written by the tests; the site refusal goes through the real ClientApp, and a refused
round charges nothing to the site's privacy ledger.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from flwr.app import MessageType

from fedseek.data import DataError, load_table
from fedseek.privacy import LEDGER_FILE
from fedseek.runtime.site_runtime import resolve_site
from fedseek.wire.data_schema import DataSchema, schema_mismatch, schema_of
from fedseek.wire.records import CONFIG, EvalConfig, ModelMeta, RecordError, RoundConfig, refusal_reason
from tests.test_adversarial_coordinator import _eval_msg, _send, _site, _task_identity, _train_msg  # noqa: F401 - fixture

COLUMNS = ["age", "bmi", "glucose"]


def _table(path, columns: list[str], labels=("no", "yes")) -> str:
    rng = np.random.default_rng(0)
    df = pd.DataFrame(rng.normal(size=(20, len(columns))), columns=columns)
    df["outcome"] = [labels[i % len(labels)] for i in range(20)]
    df.to_csv(path, index=False)
    return str(path)


def _schema(tmp_path, columns: list[str], **kw) -> DataSchema:
    return load_table(_table(tmp_path / f"{'_'.join(columns)}.csv", columns, **kw), "outcome", classes=kw.get("classes")).schema()


@pytest.fixture
def coordinator_schema(tmp_path) -> DataSchema:
    return load_table(_table(tmp_path / "test.csv", COLUMNS), "outcome", classes=["no", "yes"]).schema()


def test_a_table_schema_names_its_columns_in_order_and_its_classes(coordinator_schema):
    assert coordinator_schema.features == COLUMNS and coordinator_schema.classes == ["no", "yes"]
    assert coordinator_schema.input_shape == [3] and coordinator_schema.dtype == "float32"


@pytest.mark.parametrize("columns, needle", [
    (["age", "bmi"], "missing columns ['glucose']"),
    (["age", "bmi", "glucose", "weight"], "unexpected columns ['weight']"),
    (["age", "glucose", "bmi"], "different order: position 2 is 'glucose', expected 'bmi'"),
])
def test_a_site_table_that_differs_is_named_in_one_line(tmp_path, coordinator_schema, columns, needle):
    problem = schema_mismatch(coordinator_schema, _schema(tmp_path, columns))
    assert problem is not None and needle in problem and "\n" not in problem


def test_agreeing_tables_match(tmp_path, coordinator_schema):
    assert schema_mismatch(coordinator_schema, _schema(tmp_path, list(COLUMNS))) is None


def test_class_lists_must_agree_and_the_fix_is_named():
    expected = schema_of((3,), 3, None, ["a", "b", "c"])
    extra = str(schema_mismatch(expected, schema_of((3,), 3, None, ["a", "b", "secret-label"])))
    assert "do not map to the coordinator's classes ['a', 'b', 'c']" in extra and "set data.classes" in extra
    assert "secret-label" not in extra  # a site's label values come from its records: never sent
    shifted = schema_mismatch(expected, schema_of((3,), 2, None, ["a", "c"]))  # a site without class b, mapped by sorted order
    assert shifted is not None and "set data.classes" in shifted
    assert "input shape [4], expected [3]" == schema_mismatch(expected, schema_of((4,), 3, None, None))
    counted = schema_mismatch(schema_of((3,), 3, None, None), schema_of((3,), 2, None, None))
    assert counted == "this site's labels do not map to the coordinator's 3 classes (set data.classes to the coordinator's list)"
    assert "2" not in counted  # nor how many distinct labels the site has


def test_duplicated_csv_columns_are_an_error(tmp_path):
    path = tmp_path / "dup.csv"
    path.write_text("age,bmi,age,outcome\n1,2,3,no\n4,5,6,yes\n")
    with pytest.raises(DataError, match=r"duplicated column names \['age'\]"):
        load_table(path, "outcome")


def test_duplicated_parquet_columns_are_an_error(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "dup.parquet"
    pq.write_table(pa.table([[1.0, 2.0], [3.0, 4.0], ["no", "yes"]], names=["age", "age", "outcome"]), path)
    with pytest.raises(DataError, match="duplicated column names"):
        load_table(path, "outcome")


def test_an_undeclared_class_is_an_error(tmp_path):
    with pytest.raises(DataError, match="not among the configured classes"):
        load_table(_table(tmp_path / "t.csv", COLUMNS, labels=("no", "yes", "maybe")), "outcome", classes=["no", "yes"])


def test_the_schema_travels_in_round_and_evaluation_configs(coordinator_schema):
    meta = ModelMeta(kind="mlp", input_shape=[3], num_classes=2)
    rc = RoundConfig(server_round=1, num_rounds=1, lr=0.1, local_epochs=1, batch_size=8, model=meta, data_schema=coordinator_schema)
    assert RoundConfig.from_record(rc.to_record()).data_schema == coordinator_schema
    ec = EvalConfig(server_round=1, model=meta, data_schema=coordinator_schema)
    assert EvalConfig.from_record(ec.to_record()).data_schema == coordinator_schema
    bad = rc.to_record()
    bad["data-schema"] = "[" * 10_000
    with pytest.raises(RecordError, match="data-schema"):
        RoundConfig.from_record(bad)


def test_a_site_whose_data_differs_refuses_before_training_and_spends_nothing(tmp_path):
    ctx = _site(tmp_path)  # breast cancer, 30 features, DP policy
    site = resolve_site(ctx)
    assert site.schema is not None and site.schema.input_shape == [30]
    other = schema_of((29,), 2, None, None)
    reply = _send(_train_msg(1, data_schema=other), ctx)
    reason = refusal_reason(reply.content)
    assert reason == "data schema differs from the coordinator's: input shape [30], expected [29]"
    assert not (site.state_dir / LEDGER_FILE).exists()  # refused before the ledger was opened: nothing charged
    ok = _send(_train_msg(1, data_schema=site.schema), ctx)  # the schema it really has: it trains
    assert refusal_reason(ok.content) is None and "update" in ok.content.array_records
    assert (site.state_dir / LEDGER_FILE).exists()


def test_a_site_whose_data_differs_refuses_evaluation(tmp_path):
    ctx = _site(tmp_path)
    msg = _eval_msg(1)
    cfg = EvalConfig.from_record(msg.content.config_records[CONFIG])
    msg.content[CONFIG] = EvalConfig(server_round=1, model=cfg.model, data_schema=schema_of((30,), 3, None, None)).to_record()
    assert msg.metadata.message_type == MessageType.EVALUATE
    assert refusal_reason(_send(msg, ctx).content) == ("data schema differs from the coordinator's: this site's labels do not "
                                                       "map to the coordinator's 3 classes (set data.classes to the coordinator's list)")
