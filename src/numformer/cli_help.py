"""The help formatter of every ``numformer`` (sub)command parser."""

from __future__ import annotations

import argparse
import copy


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help when it has a real default the
    help does not already state (argparse's ArgumentDefaultsHelpFormatter also adds
    "(default: None)" and repeats defaults written into the text)."""

    @staticmethod
    def _shows_default(action) -> bool:
        text = action.help or ""
        default = action.default
        return not ("(default" in text or "%(default)" in text or not action.option_strings
                    or text is argparse.SUPPRESS or default is None or default is False or default == []
                    or default is argparse.SUPPRESS)

    def _get_help_string(self, action):
        text = action.help or ""
        if not self._shows_default(action):
            return text
        return f"{text} (default: %(default)s)" if text.strip() else "(default: %(default)s)"

    def _format_action(self, action):
        if not (action.help or "").strip() and self._shows_default(action):   # argparse skips empty help
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


class Parser(argparse.ArgumentParser):
    """Every numformer (sub)command parser: the same help formatter."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
