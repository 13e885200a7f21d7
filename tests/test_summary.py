import pytest

from radflow.summary import END, START, headline, readme_block, update_readme


def _metrics():
    ci = lambda v, lo, hi: {"value": v, "ci_low": lo, "ci_high": hi}  # noqa: E731
    ens = {
        name: ci(0.5, 0.4, 0.6) for name in ("auprc", "sensitivity", "specificity", "brier", "ece")
    }
    ens.update(
        auroc=ci(0.9123, 0.8456, 0.9789),
        threshold=0.4321,
        n_folds=3,
        n_cases=20,
        n_patients=15,
        n_positive=9,
    )
    return {
        "ensemble_test": ens,
        "settings": {"alpha": 0.05},
        "folds": [{"test_auroc": 0.81}, {"test_auroc": 0.87}, {"test_auroc": 0.84}],
    }


def test_readme_block_reports_the_measured_values():
    block = readme_block(_metrics())
    assert "| AUROC | 0.912 | 0.846-0.979 |" in block
    assert "(20 images, 15 patients, 9 positive)" in block and "95% CI" in block
    assert "| 0.810-0.870 |" in block
    assert "0.912  (95% CI 0.846-0.979)" in headline(_metrics())


def test_update_readme_replaces_only_the_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{START}\nold numbers\n{END}\noutro\n")
    update_readme(readme, _metrics())
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n")
    assert "old numbers" not in text and "| AUROC | 0.912 |" in text
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="demo-result"):
        update_readme(readme, _metrics())
