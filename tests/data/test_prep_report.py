from typer.testing import CliRunner

from conftest import alpaca_rows, write_jsonl
from snugtune.cli import app
from snugtune.data.prep_report import DataReport, report_lines


def test_report_lines_name_the_format_its_reason_and_every_count():
    report = DataReport(format="alpaca", format_reason="rows have 'instruction' and 'output'",
                        chat_template="the model's own", rows_read=100, kept=90, truncated=3, documents_split=2,
                        chunks=9, dropped={"blank answer": 6, "invalid JSON": 4}, train_samples=85, eval_samples=5,
                        train_tokens=12345, unused_columns=["id", "source"])
    text = "\n".join(report_lines(report))
    assert "data format: alpaca (rows have 'instruction' and 'output'); chat template: the model's own" in text
    assert "rows read 100, kept 90, dropped 10 (6 blank answer, 4 invalid JSON), truncated 3 to max_seq_len" in text
    assert "split 2 documents longer than max_seq_len into 9 chunks" in text
    assert "train 85, eval 5; 12,345 training tokens" in text
    assert "columns not used by the alpaca format: id, source" in text


def test_data_command_prints_the_format_drops_and_marks_trained_tokens(tmp_path):
    rows = alpaca_rows(20) + [{"instruction": "blank", "input": "", "output": ""}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    config = tmp_path / "c.yaml"
    config.write_text(f"model: shape:tiny\ndata: {{path: {data}}}\n")
    result = CliRunner().invoke(app, ["data", str(config), "--show", "1"])
    assert result.exit_code == 0, result.output
    assert "data format: alpaca (rows have 'instruction' and 'output')" in result.output
    assert "rows read 21, kept 20, dropped 1 (1 blank answer)" in result.output
    assert "[[The sum is" in result.output and "<|im_end|>" in result.output
