"""Identity metrics: word-boundary matching, the user's word list, prompt groups and the per-group split."""

import json

import numpy as np
import pytest

from detox.data import DataFormatError
from detox.identity import (NO_GROUP, IdentityTerms, groups_of_prompt, identity_summary, markdown_identity,
                            prompt_groups, retention)


@pytest.fixture(scope="module")
def shipped():
    return IdentityTerms.load()


def test_terms_match_whole_words_only(shipped):
    assert shipped.groups_in("Gay rights are human rights") == {"lgbtq"}
    assert not shipped.mentions("a gayety of colours")  # a longer word is no mention
    assert not shipped.mentions("the Caucasian mountains")  # 'asian' inside a word
    assert not shipped.mentions("public transport is cheap")  # 'trans' inside a word
    assert shipped.groups_in("the same-sex marriage act") == {"lgbtq"}
    assert shipped.groups_in("same  sex couples") == {"lgbtq"}  # space or hyphen, any run
    assert shipped.groups_in("LGBTQIA+ youth") == {"lgbtq"}  # trailing * = any word ending
    assert shipped.groups_in("Muslims and Jews met") == {"muslim", "jewish"}
    assert shipped.mentions("my wheelchair", "physical_disability") and not shipped.mentions("my wheelchair", "muslim")


def test_shipped_list_covers_the_data_groups_and_more(shipped):
    data_groups = {"asian", "bisexual", "black", "chinese", "immigrant", "lgbtq", "mental_disability", "mexican",
                   "middle_east", "native_american"}
    assert data_groups <= set(shipped.terms)
    assert {"jewish", "muslim", "christian", "women", "physical_disability"} <= set(shipped.terms)


def test_user_word_list_replaces_the_shipped_one(tmp_path):
    f = tmp_path / "terms.json"
    f.write_text(json.dumps({"sailors": ["sailor", "sailors", "seafar*"]}))
    terms = IdentityTerms.load(f)
    assert set(terms.terms) == {"sailors"} and terms.source == str(f)
    assert terms.groups_in("Seafaring folk and a sailor") == {"sailors"}
    assert not terms.mentions("gay muslim women")  # the shipped groups are gone
    for bad, why in [('{"a": []}', "non-empty list"), ('["x"]', "JSON object"), ('{"a": ["x", 3]}', "non-empty list"),
                     ('{"a": [', "invalid JSON"), ('{"(none)": ["x"]}', "reserved")]:
        f.write_text(bad)
        with pytest.raises(DataFormatError, match=f"terms.json.*{why}|{why}.*") as err:
            IdentityTerms.load(f)
        assert str(f) in str(err.value)


def test_prompt_groups_come_from_the_group_field_then_the_source_then_the_text(tmp_path, shipped):
    assert groups_of_prompt({"text": "muslims are", "group": "women"}, shipped) == ["women"]
    assert groups_of_prompt({"text": "they say", "group": ["b", "a", "b"]}, shipped) == ["a", "b"]
    assert groups_of_prompt({"text": "it would be easier if the", "source": "toxigen/hate_mental_disability"},
                            shipped) == ["mental_disability"]
    assert groups_of_prompt({"text": "my gay muslim friend", "source": "dghs_dev/hate"}, shipped) == ["lgbtq", "muslim"]
    assert groups_of_prompt({"text": "the weather is"}, shipped) == []
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"id": "x", "text": "Asian food"}) + "\n" + json.dumps({"text": "hello"}) + "\n")
    assert prompt_groups(p, shipped) == {"x": ["asian"], "1": []}  # ids as read_prompts makes them


def _rows(spec):
    return [{"prompt_id": pid, "prompt": "", "sample": k, "text": text, "toxicity": tox}
            for pid, samples in spec.items() for k, (text, tox) in enumerate(samples)]


def test_summary_splits_every_toxicity_metric_by_prompt_group(shipped):
    rows = _rows({
        "a": [("asian americans vote", 0.9), ("they vote", 0.1)],  # group asian
        "b": [("nothing here", 0.2), ("gay people too", 0.3)],  # group lgbtq
        "c": [("muslim and asian", 0.6), ("fine", 0.0)],  # groups asian and muslim
        "d": [("the women", 0.1), ("ok", 0.05)],  # no group
    })
    groups = {"a": ["asian"], "b": ["lgbtq"], "c": ["asian", "muslim"], "d": []}
    s = identity_summary(rows, groups, shipped)
    assert s["mentions_any_group"] == pytest.approx(4 / 8)
    assert s["mentions_any_group_on_identity_prompts"] == pytest.approx(3 / 6) and s["num_identity_prompts"] == 3
    assert list(s["by_group"]) == ["asian", "lgbtq", "muslim", NO_GROUP]
    asian = s["by_group"]["asian"]  # prompts a and c
    assert asian["num_prompts"] == 2
    assert asian["expected_max_toxicity"] == pytest.approx((0.9 + 0.6) / 2)
    assert asian["toxicity_probability"] == pytest.approx(1.0)
    assert asian["mean_toxicity"] == pytest.approx((0.9 + 0.1 + 0.6 + 0.0) / 4)
    assert asian["mentions_any_group"] == pytest.approx(2 / 4) and asian["mentions_own_group"] == pytest.approx(2 / 4)
    assert s["by_group"]["muslim"]["mentions_own_group"] == pytest.approx(1 / 2)
    assert s["by_group"]["lgbtq"]["toxicity_probability"] == 0.0
    none = s["by_group"][NO_GROUP]
    assert none["num_prompts"] == 1 and none["mentions_any_group"] == pytest.approx(0.5) and none["mentions_own_group"] is None

    fewer = identity_summary(_rows({"a": [("they vote", 0.1), ("x", 0.1)], "b": [("y", 0.0), ("z", 0.0)],
                                    "c": [("asian", 0.0), ("w", 0.0)], "d": [("v", 0.0), ("u", 0.0)]}), groups, shipped)
    assert retention(fewer, s) == pytest.approx((1 / 6) / (3 / 6))
    report = markdown_identity(fewer, s)
    assert "identity retention (this / other on identity prompts): 0.333" in report
    assert "| asian | 2 | 0.750 → 0.050 |" in report


def test_eval_refuses_a_bad_word_list_before_generating(tmp_path, llama_target_dir):
    from click.testing import CliRunner

    from detox.cli.main import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"text": "the river"}) + "\n")
    terms = tmp_path / "my_terms.json"
    terms.write_text('{"rivers": "river"}')
    r = CliRunner().invoke(main, ["eval", "--target", str(llama_target_dir), "--prompts", str(prompts), "--no-calibrator",
                                  "--identity-terms", str(terms), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "my_terms.json" in r.output and "'rivers'" in r.output, r.output
    assert not (tmp_path / "o").exists()


def test_first_token_ids_are_the_longest_word_initial_entries_each_spelling_starts_with():
    terms = IdentityTerms({"women": ["women", "woman"], "muslim": ["muslim*"], "poc": ["people of color"]})
    surfaces = [" wo", " women", "women", " Wom", " Mus", " Muslim", " people", None, " m", " woman"]
    # " women", " Wom"(en), " Muslim", " m"(uslim: the longest entry it starts with), " woman"; never "women", " people"
    assert terms.first_token_ids(surfaces) == {1, 3, 5, 8, 9}


def test_exempt_identity_alignment_scales_only_the_terms_first_tokens(contrast_llama, tiny_calibrator,
                                                                      llama_target_dir, tmp_path):
    """``detox align --exempt-identity``: the token map of the plain alignment and a ``token_scale`` that is
    ``--exempt-penalty`` (default 0: the contrast rule adds nothing there) at the first token of every single-word
    term and 1 elsewhere, recorded in the manifest with the gate and the scorer it asks; re-aligning keeps all three
    (and records the scorer of the detox that re-aligns) unless told ``--exempt-identity none``; a missing word list,
    interpolate fusion and a penalty or gate without a word list are refused."""
    from click.testing import CliRunner
    from safetensors.numpy import load_file

    from detox.cli.main import main
    from detox.scorer_base import shipped_scorer_label
    from detox.targets import locate_target
    from detox.token_map import vocab_surfaces

    arrays = {}
    for name, extra in (("plain", []), ("exempt", ["--exempt-identity", "builtin"]),
                        ("quarter", ["--exempt-identity", "builtin", "--exempt-penalty", "0.25", "--exempt-gate", "0.1"])):
        r = CliRunner().invoke(main, ["align", "--target", str(llama_target_dir), "--calibrator", str(contrast_llama),
                                      "--out", str(tmp_path / name), "--onnx-weights", "float32", *extra])
        assert r.exit_code == 0, r.output
        arrays[name] = load_file(str(tmp_path / name / "alignment.safetensors"))
    ids = sorted(IdentityTerms.load().first_token_ids(vocab_surfaces(*locate_target(str(llama_target_dir)).vocabulary())))
    assert len(ids) > 0 and "token_scale" not in arrays["plain"]
    for name, share in (("exempt", 0.0), ("quarter", 0.25)):
        assert (arrays[name]["token_map"] == arrays["plain"]["token_map"]).all()
        expected = np.ones(len(arrays["plain"]["token_map"]), np.float32)
        expected[ids] = share
        assert (arrays[name]["token_scale"] == expected).all()
        settings = json.loads((tmp_path / name / "manifest.json").read_text())["alignment"]["settings"]
        assert settings["exempt_identity"] == "built-in" and settings["exempt_penalty"] == share
    manifest = json.loads((tmp_path / "exempt" / "manifest.json").read_text())
    assert manifest["alignment"]["metrics"]["exempt_tokens"] == len(ids)
    alignments = {name: json.loads((tmp_path / name / "manifest.json").read_text())["alignment"] for name in arrays}
    assert {name: al["exempt_gate"] for name, al in alignments.items()} == {"plain": None, "exempt": None, "quarter": 0.1}
    # which scorer the gate was aligned with
    assert ({name: al["settings"].get("exempt_gate_scorer") for name, al in alignments.items()}
            == {"plain": None, "exempt": None, "quarter": shipped_scorer_label()})
    for source, extra, keeps in (("quarter", [], True), ("quarter", ["--exempt-identity", "none"], False)):
        out = tmp_path / f"again-{len(extra)}"
        r = CliRunner().invoke(main, ["align", "--target", str(llama_target_dir), "--calibrator", str(tmp_path / source),
                                      "--out", str(out), "--onnx-weights", "float32", *extra])
        assert r.exit_code == 0 and ("keeping" in r.output) == keeps, r.output
        again = load_file(str(out / "alignment.safetensors"))
        assert (again["token_map"] == arrays["plain"]["token_map"]).all()
        alignment = json.loads((out / "manifest.json").read_text())["alignment"]
        if keeps:  # re-aligning (e.g. the shipped default to another target) keeps the exemption, penalty and gate
            assert (again["token_scale"] == arrays["quarter"]["token_scale"]).all() and alignment["exempt_gate"] == 0.1
            assert alignment["settings"]["exempt_penalty"] == 0.25
            assert alignment["settings"]["exempt_gate_scorer"] == shipped_scorer_label()  # bound to the scorer of this detox
        else:
            assert "token_scale" not in again and alignment["exempt_gate"] is None
    terms = tmp_path / "my_terms.json"
    terms.write_text(json.dumps({"women": ["women"]}))
    for calibrator, out, extra in ((contrast_llama, "own", ["--exempt-identity", str(terms)]), (tmp_path / "own", "own2", [])):
        r = CliRunner().invoke(main, ["align", "--target", str(llama_target_dir), "--calibrator", str(calibrator),
                                      "--out", str(tmp_path / out), "--onnx-weights", "float32", *extra])
        assert r.exit_code == 0, r.output
    assert "pass --exempt-identity FILE to keep that" in r.output  # a user's word list is not carried (its file)
    assert "token_scale" not in load_file(str(tmp_path / "own2" / "alignment.safetensors"))
    for extra, says in ((["--exempt-penalty", "0.5"], "needs --exempt-identity"),
                        (["--exempt-gate", "0.5"], "--exempt-gate needs --exempt-identity"),
                        (["--exempt-identity", "builtin", "--exempt-gate", "0"], "--exempt-gate"),
                        (["--exempt-identity", "builtin", "--exempt-penalty", "1"], "--exempt-penalty")):
        r = CliRunner().invoke(main, ["align", "--target", str(llama_target_dir), "--calibrator", str(contrast_llama),
                                      "--out", str(tmp_path / "z"), *extra])
        assert r.exit_code != 0 and says in r.output and not (tmp_path / "z").exists(), r.output
    r = CliRunner().invoke(main, ["align", "--target", str(llama_target_dir), "--calibrator", str(contrast_llama),
                                  "--out", str(tmp_path / "x"), "--exempt-identity", str(tmp_path / "none.json")])
    assert r.exit_code != 0 and "identity terms file not found" in r.output and not (tmp_path / "x").exists()
    r = CliRunner().invoke(main, ["align", "--target", str(llama_target_dir), "--calibrator", str(tiny_calibrator),
                                  "--out", str(tmp_path / "y"), "--exempt-identity", "builtin"])
    assert r.exit_code != 0 and "contrast fusion only" in r.output and not (tmp_path / "y").exists()
