import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from effc.errors import PassOptionError
from effc.pipeline_text import Spec, parse_pipeline, print_pipeline

names = st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True)
keys = st.from_regex(r"[a-z_][a-z0-9_]{0,6}", fullmatch=True)
scalars = (
    st.booleans()
    | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4), max_leaves=8)
options = st.dictionaries(keys, values, max_size=3)


def specs(depth=2):
    leaf = st.builds(Spec, names, options)
    if depth == 0:
        return leaf
    group = st.builds(
        Spec,
        st.sampled_from(["seq", "fixpoint"]),
        st.just({}),
        st.lists(specs(depth - 1), min_size=1, max_size=3),
    )
    return leaf | group


@given(st.lists(specs(), min_size=1, max_size=4))
def test_print_then_parse_round_trips(pipeline):
    text = print_pipeline(pipeline)
    assert parse_pipeline(text) == pipeline
    assert print_pipeline(parse_pipeline(text)) == text


@pytest.mark.parametrize(
    "text",
    [
        "cleanup,group-prune{sparsity=0.5,group=16,skip=[lm_head]},quantize{bits=4,group=16}",
        "fixpoint(cleanup,fuse)",
        'fuse{rules=[batchnorm,matmul-add]},x{s="a,b",t="1.5",u=true,v=-3,w=1e-05,e=[]}',
        "fixpoint{max_iter=3}(cleanup,seq(fuse,cleanup))",
    ],
)
def test_canonical_text_prints_back_identically(text):
    assert print_pipeline(parse_pipeline(text)) == text


def test_values_are_typed():
    (spec,) = parse_pipeline('p{a=1,b=1.5,c=true,d=x,e="2",f=[1,"y"]}')
    assert spec.options == {"a": 1, "b": 1.5, "c": True, "d": "x", "e": "2", "f": [1, "y"]}
    assert type(spec.options["a"]) is int


def test_whitespace_is_allowed_and_dropped_when_printed():
    assert (
        print_pipeline(parse_pipeline(" cleanup , fuse{ rules = [ batchnorm ] } "))
        == "cleanup,fuse{rules=[batchnorm]}"
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty pipeline"),
        ("cleanup,", "expected a pass name"),
        ("fuse{rules}", "expected '='"),
        ("fuse{a=1", "expected '}'"),
        ('fuse{a="x}', "unterminated string"),
        ("fixpoint(cleanup", "expected ')'"),
        ("fuse{a=1,a=2}", "given twice"),
        ("Cleanup", "expected a pass name"),
        ("cleanup fuse", "unexpected"),
    ],
)
def test_syntax_errors_name_the_problem_and_column(text, message):
    with pytest.raises(PassOptionError, match=re.escape(message)) as err:
        parse_pipeline(text)
    assert "column" in str(err.value)
