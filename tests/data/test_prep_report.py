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


def test_report_lines_say_how_the_data_was_read_and_every_per_turn_field():
    report = DataReport(format="messages", format_reason="rows have a 'messages' list", chat_template="the model's own",
                        source_notes=["CSV separator ';' (sniffed from the first lines)"],
                        turn_fields={"role": "the turn's role", "timestamp": "not used", "weight": "OpenAI's loss flag"},
                        blank_answers=2, merged_turns=3)
    lines = report_lines(report)
    assert lines[0] == "read: CSV separator ';' (sniffed from the first lines)"
    assert "turn field 'timestamp': not used" in lines and "turn field 'weight': OpenAI's loss flag" in lines
    assert not any("'role'" in line for line in lines)  # the fields every turn has go without saying
    assert any(line.startswith("removed 2 blank answers") for line in lines)
    assert any(line.startswith("merged 3 turns") for line in lines)


def test_data_command_prints_every_per_turn_field_and_what_it_did(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Hi", "timestamp": "2024-01-01"},
                          {"role": "assistant", "content": "Hello.", "reasoning_content": "Greet."}]}] * 3
    config = tmp_path / "c.yaml"
    config.write_text(f"model: shape:tiny\ndata: {{path: {write_jsonl(tmp_path / 'd.jsonl', rows)}, reasoning: drop}}\n")
    result = CliRunner().invoke(app, ["data", str(config)])
    assert result.exit_code == 0, result.output
    assert "turn field 'timestamp': not used" in result.output
    assert "turn field 'reasoning_content': reasoning of assistant turns: left out (data.reasoning: drop)" in result.output
