"""The default shift: the clean inputs unchanged."""

from harness.core.shift import Shift, register_shift


@register_shift("none")
class NoShift(Shift):
    """No shift: the clean inputs as they are."""

    description = "the clean inputs unchanged (the default)"

    def apply(self, x, y, *, context):
        return x
