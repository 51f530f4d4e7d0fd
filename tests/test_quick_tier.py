"""The quick tier (pytest -m "not slow"): how tests/conftest.py tells a slow test from its code, and run_plm.py
end to end in this process, so that the quick tier runs each of the three scripts at least once
(run_clm.py and run_mlm.py: tests/test_upstream_examples.py)."""

import subprocess
import sys
from unittest.mock import patch

import pytest

import run_plm
from conftest import QUICK, TINY, WIKI_TEST_RAW, read_json, run_script
from tiers import Reach, reach


class FakeTrainer:
    def train(self):
        return None


def trainer(max_steps: int = 10):
    return FakeTrainer()


def starts_a_script():
    run_script("clm", "--help")


def starts_a_process_itself():
    subprocess.run(["true"])


def trains_a_few_steps():
    trainer(max_steps=2).train()


def trains_the_helpers_default():
    trainer().train()  # its 10 steps


def trains_twice_in_a_loop():
    for _ in range(2):
        trainer(max_steps=1).train()


def trains_once_whichever_branch(flag):
    if flag:
        trainer(max_steps=1).train()
        return
    trainer(max_steps=2).train()


def passes_a_starter_on(pool):
    pool.submit(starts_a_process_itself)


def counts_steps_without_training():
    return {"max_steps": 40}


@pytest.mark.parametrize("case", [starts_a_script])
def is_given_a_starter_as_data(case):
    return case


@pytest.mark.parametrize("function, why", [
    (starts_a_script, "starts a process (subprocess.run)"),
    (starts_a_process_itself, "starts a process (subprocess.run)"),
    (passes_a_starter_on, "starts a process (subprocess.run)"),
    (trains_the_helpers_default, "trains 10 steps"),
    (trains_twice_in_a_loop, "trains several times"),
    (trains_a_few_steps, None),
    (trains_once_whichever_branch, None),
    (counts_steps_without_training, None),
    (is_given_a_starter_as_data, None),
])
def test_a_test_is_slow_when_its_code_starts_a_process_or_trains_more_than_a_few_steps(function, why):
    assert reach(function).slow == why


def test_the_reach_of_a_test_adds_its_fixtures():
    assert Reach(runs=2).slow == "trains several times" and Reach(runs=1, steps=4).slow is None


def test_run_plm_end_to_end_in_process(tmp_path):
    args = ["run_plm.py", *TINY["plm"], *QUICK, "--max_steps", "2", "--train_file", str(WIKI_TEST_RAW),
            "--max_train_samples", "16", "--max_eval_samples", "8", "--validation_split_percentage", "10",
            "--do_train", "--do_eval", "--output_dir", str(tmp_path)]
    with patch.object(sys, "argv", args):
        run_plm.main()
    results = read_json(tmp_path / "all_results.json")
    assert results["train_samples"] == 16 and results["eval_samples"] == 8
    assert results["eval_loss"] > 0 and 0 <= results["eval_accuracy"] <= 1
