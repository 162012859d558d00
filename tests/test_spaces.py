import numpy as np
import pytest

from align_env.spaces import ChatMessages, UnicodeText, check_pair, check_response


def test_unicode_text_accepts_punctuation_unicode_and_rejects_non_strings():
    space = UnicodeText(max_length=50)
    for text in ["", "Hello, world! (yes) -- ok?", "Ünïcödé 漢字 😀\n\ttabs"]:
        assert space.contains(text)
    assert not space.contains("x" * 51)
    assert not space.contains(b"bytes")
    assert not space.contains(3)


def test_unicode_text_sample_is_seeded_and_valid():
    a, b = UnicodeText(), UnicodeText()
    a.seed(7)
    b.seed(7)
    xs, ys = [a.sample() for _ in range(20)], [b.sample() for _ in range(20)]
    assert xs == ys
    assert all(a.contains(x) for x in xs)
    assert len(set(xs)) > 15


def test_chat_messages_contains():
    space = ChatMessages()
    assert space.contains([{"role": "user", "content": "hi, there!"}])
    assert not space.contains([{"role": "robot", "content": "hi"}])
    assert not space.contains([{"role": "user"}])
    assert not space.contains("hi")
    space.seed(1)
    assert all(space.contains(space.sample()) for _ in range(10))


def test_bad_responses_name_the_problem():
    with pytest.raises(TypeError, match="bytes"):
        check_response(b"x")
    with pytest.raises(TypeError, match="must be str"):
        check_response(None)
    with pytest.raises(TypeError, match="pair of responses"):
        check_pair("just one")
    with pytest.raises(ValueError, match="exactly 2"):
        check_pair(("a", "b", "c"))
    assert check_pair(["a", "b"]) == ("a", "b")
    assert check_pair(np.array(["a", "b"], dtype=object)) == ("a", "b")
