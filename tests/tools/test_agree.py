"""``tokenmerge agree`` on tiny random vision-language models saved with save_pretrained:
the full model agrees with itself, a setting that reduces nothing agrees with it on
every answer, the counts and files are right, and bad input is one line before any work.
(Random weights: what this checks is the mechanics, not the quality of any setting.)"""
import csv
import json

import pytest

from tests.adapters.vlm_models import FAMILIES, make, pictures
from tokenmerge.tools.agree import FULL, Answer, summarize, warnings_of
from tokenmerge.tools.cli import main

BY_ID = {family.id: family for family in FAMILIES}


def save(family_id, folder, images):
    """A tiny model of the family saved in ``folder / "model"``, and ``images`` pictures in ``folder / "images"``."""
    model, processor = make(BY_ID[family_id])
    model.save_pretrained(folder / "model")
    processor.save_pretrained(folder / "model")
    (folder / "images").mkdir()
    for index, picture in enumerate(pictures(images)):
        picture.save(folder / "images" / f"{index}.png")
    return folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved tiny LLaVA (64 visual tokens per image) and a folder of three photos."""
    return save("llava", tmp_path_factory.mktemp("vlm"), 3)


def run_agree(capsys, *args):
    try:
        status = main(["agree", *map(str, args), "--max-new-tokens", "3", "--warmup", "0"])
    except SystemExit as error:  # argparse's refusal of an option's value
        status = error.code
    out, err = capsys.readouterr()
    return status, out, err


def table_rows(out):
    """The rows of the printed table, by setting: the cells after the setting's name."""
    lines = [line.split() for line in out.splitlines()[3:] if line.strip()]
    return {line[0]: line[1:] for line in lines}


def test_a_setting_that_reduces_nothing_gives_every_answer_of_the_full_model(saved, capsys, tmp_path):
    output = tmp_path / "answers.csv"
    status, out, err = run_agree(capsys, saved / "model", "--images", saved / "images", "--visual-tokens",
                                 "64,1.0,8", "--tower-r", "0", "--output", output)
    assert status == 0, err
    rows = table_rows(out)
    assert set(rows) == {FULL, "visual_tokens=64", "visual_tokens=1.0", "visual_tokens=8", "r=0"}
    for setting in (FULL, "visual_tokens=64", "visual_tokens=1.0", "r=0"):
        samples, tokens, identical, first = rows[setting][:4]
        assert (samples, identical, first) == ("3", "100.0", "100.0"), setting
    assert rows["visual_tokens=8"][1] == "8.0"  # every image reached the language model as 8 tokens
    assert "fewer than 5 samples" in err  # three samples: the speed is flagged as untrusted
    with output.open() as handle:
        answers = list(csv.DictReader(handle))
    assert len(answers) == 3 * 5
    assert {row["identical"] for row in answers if row["setting"] == "r=0"} == {"True"}


def test_questions_per_image_come_from_a_prompts_file_and_an_unreadable_image_is_skipped(saved, capsys, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    prompts = tmp_path / "prompts.jsonl"
    lines = [{"image": str(saved / "images" / "0.png"), "question": "what is this ?"},
             {"image": "broken.png", "question": "what is this ?"},
             {"image": str(saved / "images" / "1.png"), "question": "a cat ?"}]
    prompts.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    status, out, err = run_agree(capsys, saved / "model", "--prompts", prompts, "--visual-tokens", "16")
    assert status == 0, err
    assert "skipped" in err and "broken.png" in err
    assert table_rows(out)["visual_tokens=16"][0] == "2"


@pytest.mark.parametrize("args, message", [
    (["{missing}", "--images", "{images}"], "no config.json"),
    (["{model}", "--images", "{missing}"], "no such folder"),
    (["{model}", "--images", "{model}"], "holds no images"),
    (["{model}", "--images", "{images}", "--output", "{images}"], "is a folder"),
    (["{model}", "--images", "{images}", "--device", "cuda:7"], "--device cuda:7"),
])
def test_bad_input_is_one_line_before_any_work(saved, capsys, tmp_path, args, message):
    places = {"model": saved / "model", "images": saved / "images", "missing": tmp_path / "missing"}
    status, out, err = run_agree(capsys, *(arg.format(**places) for arg in args))
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1 and "answering" not in err


@pytest.mark.parametrize("counts, message", [("0", "at least 1"), ("1.5", "(0, 1]"), ("many", "whole number")])
def test_a_bad_count_is_refused_as_the_option_is_read(saved, capsys, counts, message):
    status, _, err = run_agree(capsys, saved / "model", "--visual-tokens", counts)
    assert status == 2 and message in err.splitlines()[-1]


def test_a_folder_of_another_model_is_refused_by_name(saved, capsys, tmp_path):
    import transformers

    transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                 intermediate_size=64)).save_pretrained(tmp_path)
    capsys.readouterr()
    status, _, err = run_agree(capsys, tmp_path, "--images", saved / "images")
    assert status == 2 and len(err.strip().splitlines()) == 1 and str(tmp_path) in err


def answer(tokens, first, whole):
    return Answer(tokens, first, whole, [4])


def test_speed_ups_are_medians_of_per_sample_ratios_and_agreement_counts_answers():
    answers = {FULL: [answer([1, 2], 1.0, 2.0), answer([3], 2.0, 4.0), None, answer([5], 3.0, 3.0)],
               "visual_tokens=4": [answer([1, 2], 0.5, 1.0), answer([4], 0.5, 2.0), answer([1], 1.0, 1.0),
                                   answer([5, 6], 1.0, 3.0)]}
    row = summarize(answers)[1]
    assert row["samples"] == 3  # the sample the full model has no answer for is left out
    assert row["identical"] == pytest.approx(100 / 3) and row["first_token"] == pytest.approx(200 / 3)
    assert row["first_token_speedup"] == 3.0 and row["answer_speedup"] == 2.0
    assert any("fewer than 5 samples" in warning for warning in warnings_of(summarize(answers)))


def test_the_qwen_family_answers_at_its_own_resolution(capsys, tmp_path):
    save("qwen2_5_vl", tmp_path, 2)
    status, out, err = run_agree(capsys, tmp_path / "model", "--images", tmp_path / "images", "--visual-tokens",
                                 "1.0,6")
    assert status == 0, err
    rows = table_rows(out)
    assert rows["visual_tokens=1.0"][2] == "100.0" and rows["visual_tokens=6"][1] == "6.0"
