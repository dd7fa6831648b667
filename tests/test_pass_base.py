import pytest

import effc
from effc.errors import PassOptionError
from effc.pipeline import registry


def test_builtin_passes_are_registered_with_descriptions():
    passes = registry()
    assert {"cleanup", "fuse"} <= set(passes)
    fuse = passes["fuse"].describe()
    assert fuse["kinds"] == ["fx", "onnx"]
    assert fuse["options"][0]["name"] == "rules"
    assert "batchnorm" in fuse["options"][0]["default"]


def test_unknown_pass_suggests_the_closest_name():
    with pytest.raises(PassOptionError, match="unknown pass 'cleanp'.*did you mean 'cleanup'"):
        effc.Pipeline.from_text("cleanp")


def test_unknown_option_names_the_option_and_lists_the_valid_ones():
    with pytest.raises(
        PassOptionError, match="unknown option 'rule'.*did you mean 'rules'.*its options: rules"
    ):
        effc.Pipeline.from_text("fuse{rule=[batchnorm]}")


@pytest.mark.parametrize(
    "text, message",
    [
        ("fuse{rules=batchnorm}", "option 'rules' expects a list of a string, got batchnorm"),
        ("cleanup{max_iter=1.5}", "option 'max_iter' expects an integer, got 1.5"),
        ("cleanup{max_iter=true}", "expects an integer, got true"),
        ("cleanup{max_iter=0}", "must be >= 1"),
        ("fuse{rules=[batchnrm]}", "unknown rule 'batchnrm' \\(did you mean 'batchnorm'"),
        ("fixpoint{max_iter=0}(cleanup)", "takes only max_iter"),
        ("loop(cleanup)", "unknown group 'loop'"),
    ],
)
def test_wrong_option_values_are_clear_errors(text, message):
    with pytest.raises(PassOptionError, match=message):
        effc.Pipeline.from_text(text)


def test_pass_objects_print_the_options_they_were_given():
    from effc.passes import Cleanup, Fuse

    pipeline = effc.Pipeline([Cleanup(), Fuse(rules=["batchnorm"]), "fixpoint(cleanup,fuse)"])
    assert pipeline.text == "cleanup,fuse{rules=[batchnorm]},fixpoint(cleanup,fuse)"
    assert effc.Pipeline.from_text(pipeline.text).text == pipeline.text
