"""The README stays short and its claims table is results/claims/summary.md verbatim."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_readme_claims_table_is_the_committed_summary():
    readme = (ROOT / "README.md").read_text()
    begin = readme.index("\n", readme.index("<!-- claims:begin")) + 1
    end = readme.index("<!-- claims:end")
    assert readme[begin:end] == (ROOT / "results" / "claims" / "summary.md").read_text()
