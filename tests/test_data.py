import gzip

import numpy as np
import pytest

from fedhlm_app.data.datasets import DataError, load_dataset, load_local, truncate


def _write(path, text, compress=False):
    if compress:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")


def test_official_headerless_format_with_classes_file(tmp_path):
    _write(tmp_path / "train.csv", '"1","Title a","Body a"\n"2","Title b","Body b"\n"1","T c","B c"\n')
    _write(tmp_path / "test.csv.gz", '"2","T d","B d"\n', compress=True)
    (tmp_path / "classes.txt").write_text("World\nSports\n")
    ds = load_local(tmp_path, "train.csv", "test.csv")
    assert ds.train.texts[0] == "Title a Body a"
    assert ds.train.labels.tolist() == [0, 1, 0] and ds.test.labels.tolist() == [1]
    assert ds.class_names == ["World", "Sports"]


def test_headed_label_text_format_with_string_labels_and_three_classes(tmp_path):
    _write(tmp_path / "tr.csv", "text,label,extra\nhello,pos,x\nbye,neg,y\nmeh,neutral,z\n")
    _write(tmp_path / "te.csv", "label,text\nneg,ciao\n")
    ds = load_local(tmp_path, "tr.csv", "te.csv")
    assert ds.num_classes == 3 and ds.class_names == ["neg", "neutral", "pos"]
    assert ds.train.labels.tolist() == [2, 0, 1] and ds.test.labels.tolist() == [0]


@pytest.mark.parametrize(
    "train, message",
    [
        ('"1","only-one-column-row"\n"1"\n', "too few columns"),
        ('label,text\n1,\n', "empty text"),
    ],
)
def test_malformed_rows_are_reported_with_the_file(tmp_path, train, message):
    _write(tmp_path / "train.csv", train)
    _write(tmp_path / "test.csv", '"1","a","b"\n')
    with pytest.raises(DataError, match=message):
        load_local(tmp_path, "train.csv", "test.csv")


def test_test_label_outside_train_classes_is_an_error(tmp_path):
    _write(tmp_path / "train.csv", '"1","a","b"\n"2","c","d"\n')
    _write(tmp_path / "test.csv", '"5","a","b"\n')
    with pytest.raises(DataError, match="do not occur in the train split"):
        load_local(tmp_path, "train.csv", "test.csv")


def test_missing_folder_and_file_are_named(tmp_path):
    with pytest.raises(DataError, match="is not a directory"):
        load_dataset("local", "x", str(tmp_path / "nope"), "train.csv", "test.csv")
    with pytest.raises(DataError, match="'train.csv'"):
        load_local(tmp_path, "train.csv", "test.csv")


def test_auto_source_uses_local_folder_when_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _write(tmp_path / "train.csv", '"1","a","b"\n"2","c","d"\n')
    _write(tmp_path / "test.csv", '"1","e","f"\n')
    assert load_dataset("auto", "fancyzhx/ag_news", str(tmp_path), "train.csv", "test.csv").source.startswith("local:")


def test_bundled_ag_news_is_complete():
    from fedhlm_app.paths import BUNDLED_DATA

    ds = load_local(BUNDLED_DATA, "train.csv", "test.csv")
    assert (len(ds.train), len(ds.test)) == (25569, 7600)
    assert ds.class_names == ["World", "Sports", "Business", "Sci/Tech"]
    assert np.bincount(ds.test.labels).tolist() == [1900] * 4


def test_truncate_is_seeded_subset(tmp_path):
    _write(tmp_path / "train.csv", "".join(f'"{1 + i % 2}","t{i}","d"\n' for i in range(50)))
    _write(tmp_path / "test.csv", '"1","a","b"\n')
    split = load_local(tmp_path, "train.csv", "test.csv").train
    a, b = truncate(split, 10, 3), truncate(split, 10, 3)
    assert len(a) == 10 and a.texts == b.texts
    assert truncate(split, 0, 3) is split


def test_labels_outside_the_listed_classes_are_an_error(tmp_path):
    (tmp_path / "classes.txt").write_text("World\nSports\n")
    (tmp_path / "train.csv").write_text("label,text\nWorld,a\nSports,b\nWeather,c\n")
    (tmp_path / "test.csv").write_text("label,text\nWorld,d\n")
    with pytest.raises(DataError, match=r"labels \['Weather'\] are not classes of classes.txt"):
        load_local(tmp_path, "train.csv", "test.csv")


def _load(tmp_path, train: str, test: str = '"1","e","f"\n"2","g","h"\n'):
    _write(tmp_path / "train.csv", train)
    _write(tmp_path / "test.csv", test)
    return load_local(tmp_path, "train.csv", "test.csv")


@pytest.mark.parametrize("train, message", [
    ("label,body\nWorld,a\nSports,b\n", r"needs a label column .* and a text column .* it names \['label'\]"),
    ("category_id,document_text\n1,a\n2,b\n", "the first row looks like a header"),
    ("label,text\n", "has a header but no rows"),
    ('"1","a","b"\n"1","c","d"\n', "1 class"),
])
def test_headers_are_never_data_and_degenerate_data_is_refused(tmp_path, train, message):
    with pytest.raises(DataError, match=message):
        _load(tmp_path, train, "label,text\nWorld,x\n" if train.startswith("label") else '"1","e","f"\n')


def test_recognised_headers_in_any_order_and_ag_news_columns(tmp_path):
    ds = _load(tmp_path, "sentence,category\nhello,pos\nbye,neg\n", "category,sentence\nneg,ciao\n")
    assert ds.class_names == ["neg", "pos"] and ds.train.texts == ["hello", "bye"]
    ds = _load(tmp_path, "class,title,description\n1,T a,B a\n2,T b,B b\n")
    assert ds.train.texts == ["T a B a", "T b B b"]


def test_labels_equal_but_for_case_are_one_class_and_look_alikes_are_flagged(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="fedhlm"):
        ds = _load(tmp_path, "label,text\nSports,a\nsports,b\n SPORTS ,c\nSports,d\nSport,e\nWorld,f\n",
                   "label,text\nworld,g\n")
    assert ds.class_names == ["Sport", "Sports", "World"]
    assert ds.train.labels.tolist() == [1, 1, 1, 1, 0, 2] and ds.test.labels.tolist() == [2]
    assert "differ only in case: one class 'Sports'" in caplog.text
    assert "'Sport' (1 rows) and 'Sports' (4 rows) look alike" in caplog.text


def test_corrupt_and_oversized_files_are_named(tmp_path):
    good = gzip.compress(("".join(f'"{1 + i % 2}","title {i}","text"\n' for i in range(5000))).encode())
    (tmp_path / "train.csv.gz").write_bytes(good[: len(good) // 2])  # a truncated download
    _write(tmp_path / "test.csv", '"1","e","f"\n')
    with pytest.raises(DataError, match=r"cannot read '.*train.csv.gz' after row \d+: EOFError"):
        load_local(tmp_path, "train.csv", "test.csv")
    long_text = "word " * 60_000  # 300,000 characters: more than the csv module's default field limit
    ds = _load(tmp_path, f'"1","{long_text}"\n"2","short"\n')
    assert len(ds.train.texts[0]) == len(long_text.strip())


def test_a_byte_order_mark_does_not_hide_the_header(tmp_path):
    ds = _load(tmp_path, "\ufefflabel,text\r\nWorld,a\r\nSports,b\r\n", "\ufefflabel,text\r\nWorld,c\r\n")
    assert ds.class_names == ["Sports", "World"] and ds.train.texts == ["a", "b"]
