"""A web-scale JSONL corpus with some bad lines: they are skipped and counted with their places,
`data.strict=true` refuses them, and a corpus where most lines are bad (a misnamed field) is
refused with one line. The corpus is real text: CPython's help pages, three sentences a line."""

import json

import pytest

from conftest import cli_error, tiny_flags
from data.corpora import load_documents, pydocs_documents, split_sentences
from data.wheels import DataError
from pretrain.__main__ import main
from training.metrics import read_metrics

LINES, BROKEN = 3000, 31
# What web corpora hold: cut-off JSON, a record of another kind, a text of the wrong type, an array.
BAD = ['{not json', '{"title": "a page without text"}', '{"text": 17}', '["text", "a list"]']


def real_lines(count: int) -> list[str]:
    """`count` JSONL lines of real text (three sentences of the CPython help pages each)."""
    sentences = [s for doc in pydocs_documents() for s in split_sentences(doc)]
    texts = [" ".join(sentences[i:i + 3]) for i in range(0, len(sentences), 3)]
    texts = (texts * (1 + count // len(texts)))[:count]
    return [json.dumps({"text": t, "url": f"https://docs.python.org/{i}"}) for i, t in enumerate(texts)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """3,000 lines, 31 of them broken (the first at line 17); (path, the broken line numbers)."""
    lines = real_lines(LINES)
    broken = [17 + 96 * k for k in range(BROKEN)]  # 1-based line numbers, spread over the file
    for k, lineno in enumerate(broken):
        lines[lineno - 1] = BAD[k % len(BAD)]
    path = tmp_path_factory.mktemp("web") / "crawl.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, broken


def test_bad_lines_are_skipped_and_counted_with_their_places(corpus, tmp_path):
    path, broken = corpus
    docs = load_documents(f"files:{path}", tmp_path)
    assert len(docs) == LINES - BROKEN
    assert not any(d in BAD for d in docs) and all(isinstance(d, str) for d in docs)
    # The negative control: strict refuses the very first bad line, by its place.
    with pytest.raises(DataError, match=rf"crawl.jsonl:{broken[0]}: not valid JSON; .*data.strict=false"):
        load_documents(f"files:{path}", tmp_path, strict=True)


@pytest.mark.parametrize("bad", BAD)
def test_each_kind_of_bad_line_is_named(tmp_path, bad):
    path = tmp_path / "one.jsonl"
    path.write_text("\n".join(real_lines(20) + [bad]) + "\n")
    assert len(load_documents(f"files:{path}", tmp_path)) == 20
    with pytest.raises(DataError, match=r"one.jsonl:21: (not valid JSON|no 'text' field|its 'text' "
                                        r"is a int|not a JSON object)"):
        load_documents(f"files:{path}", tmp_path, strict=True)


def test_the_share_threshold(tmp_path):
    path = tmp_path / "half.jsonl"
    path.write_text("\n".join(real_lines(9) + ['{not json']) + "\n")  # 10% bad: at the limit
    assert len(load_documents(f"files:{path}", tmp_path)) == 9
    path.write_text("\n".join(real_lines(8) + ['{not json'] * 2) + "\n")  # 20%
    with pytest.raises(DataError, match=r"2 of 10 JSONL lines hold no document .*max_skipped_share=0.1"):
        load_documents(f"files:{path}", tmp_path)
    assert len(load_documents(f"files:{path}", tmp_path, max_skipped_share=0.25)) == 8


@pytest.mark.slow  # a whole run: the default pytest stays under 15 minutes
def test_the_corpus_prepares_trains_and_reports_the_skipped_lines(corpus, tmp_path, capsys):
    path, broken = corpus
    main(["--workdir", str(tmp_path / "run"), *tiny_flags(tmp_path / "data", train__steps=2,
                                                          data__source=f"files:{path}")])
    report = json.loads(next((tmp_path / "data" / "prepared").glob("*/report.json")).read_text())
    assert report["skipped_lines"] == BROKEN
    assert report["first_skipped_lines"][0] == f"{path}:{broken[0]}"
    assert report["documents_read"] == LINES - BROKEN
    assert f"skipped_lines={BROKEN} (first {path}:{broken[0]})" in capsys.readouterr().out
    assert [m["step"] for m in read_metrics(tmp_path / "run") if "train/loss" in m] == [1, 2]


def test_strict_refuses_the_corpus_in_one_line(corpus, tmp_path, capsys):
    path, broken = corpus
    err = cli_error(capsys, main, ["--workdir", str(tmp_path / "run"), *tiny_flags(
        tmp_path / "data", data__source=f"files:{path}", data__strict=True)])
    assert f"crawl.jsonl:{broken[0]}: not valid JSON" in err


def test_a_misnamed_field_refuses_the_corpus_in_one_line(tmp_path, capsys):
    path = tmp_path / "content.jsonl"
    path.write_text("\n".join(json.dumps({"content": json.loads(l)["text"]}) for l in real_lines(200)))
    err = cli_error(capsys, main, ["--workdir", str(tmp_path / "run"), *tiny_flags(
        tmp_path / "data", data__source=f"files:{path}")])
    assert "200 of 200 JSONL lines hold no document" in err and "content.jsonl:1: no 'text' field" in err
    assert "is the field really named 'text'?" in err
