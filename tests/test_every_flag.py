"""Every flag of every command, found by walking the parser the command builds, against the
values it must refuse (issue "Reliable by construction"). No list of flags is written here:
a flag added to any script is walked the next time this file runs.

A command is every script of the project with a main() and a __main__ block. Its parsers are
those it parses with up to its first full parse (parse_args), caught by patching argparse, in
this process; a parser that textteacher.parse_config builds for a script that passes its other
flags on (compare.py, distill.py, gpu_check.py, transfer.py; step.py has no flag of its own)
is textteacher.py's, walked once as that command's, and a script's own parser must leave
every one of those flags to it. The trainer's path flags that compare.need_inputs checks for
the tools that pass them on are walked as those tools' own. Each flag must declare what it
takes (cli.number's range, cli.path's kind, cli.some_of's or argparse's choices, or type=str
for free text), and is then given:
    a number     0, -1, 10**30, 2**70, nan, inf, "" and abc, but for those its range allows
    choices      one that is none of them
    a path       a missing one where it reads, a folder where it reads or writes a file, a
                 file where it needs a folder, a path under a file, and "" unless it means none
Each must end, in this process, as the command ends: a non-zero exit within a few seconds, at
most two lines on stderr and no traceback, the flag named, and nothing written (the working
folder and the paths given are listed before and after).

What the walk cannot reach: textteacher.py's own path flags (--data, --data-dir, --text,
--init, --resume, --out-dir) are free text to its parser (type=str: its Config declares no
kind of path), so for textteacher.py itself only its numbers and choices are walked (its
checks of those paths, when a run starts, are tests/test_bad_input.py's). Nor can it tell
that a tool which reads the trainer's inputs calls compare.need_inputs: one that stops
calling it loses those flags from its walk without a failure.

Run: python -m pytest -q tests/test_every_flag.py
"""
import argparse
import dataclasses
import glob
import importlib
import math
import os
import re
import signal
import sys
import time

import pytest
from common import ROOT

import cli
import textteacher

for _tools in ("experiments", "benchmarks"):
    if os.path.join(ROOT, _tools) not in sys.path:
        sys.path.insert(0, os.path.join(ROOT, _tools))

# every script a user runs: a main() called from its __main__ block
COMMANDS = sorted(os.path.relpath(f, ROOT) for f in glob.glob(os.path.join(ROOT, "*.py"))
                  + glob.glob(os.path.join(ROOT, "experiments", "*.py"))
                  + glob.glob(os.path.join(ROOT, "benchmarks", "*.py"))
                  if re.search(r"^def main\(.*^if __name__ == .__main__.:", open(f).read(),
                               re.M | re.S))
NUMBERS = ["0", "-1", str(10 ** 30), str(2 ** 70), "nan", "inf", "", "abc"]
NOT_A_CHOICE = "no-such-choice"
SECONDS = 5  # "a few seconds": a refused flag costs milliseconds, a started run much more


def command(script):
    """The script's module, imported as the others import it (by name)."""
    module = importlib.import_module(os.path.splitext(os.path.basename(script))[0])
    assert os.path.samefile(module.__file__, os.path.join(ROOT, script)), module.__file__
    return module


class Parsed(BaseException):
    """Raised in place of a command's full parse: its parsers are known, and nothing ran."""


def parsers_of(module, monkeypatch, things):
    """[(parser, name of the module that parses with it, whether it passes on what it does
    not know)] of the parsers module.main uses up to its first full parse (parse_args), which
    is not made. Where a parser stops it for a positional it lacks, again with one, until no
    new parser is seen (transfer.py checks the trainer's paths once it has its ROOT)."""
    seen = []

    def known(self, args=None, namespace=None):
        seen.append((self, sys._getframe(1).f_globals.get("__name__"), True))
        return real(self, args, namespace)

    def full(self, args=None, namespace=None):
        seen.append((self, sys._getframe(1).f_globals.get("__name__"), False))
        raise Parsed

    real, argv = argparse.ArgumentParser.parse_known_args, []
    for _ in range(3):
        seen.clear()
        with monkeypatch.context() as m:
            m.setattr(argparse.ArgumentParser, "parse_known_args", known)
            m.setattr(argparse.ArgumentParser, "parse_args", full)
            try:
                module.main(argv)
            except (Parsed, SystemExit, cli.UserError):  # parsed, or stopped by a check
                pass
        positionals = [minimal(a, things) for p, _, _ in seen for a in p._actions
                       if not a.option_strings]
        if positionals == argv:
            break
        argv = positionals
    assert seen, f"{module.__name__} reads no flags through argparse"
    return seen


def own_flags(module, monkeypatch, things):
    """(parsers, {flag: action}) of what module.main parses itself (not textteacher.py for
    it), in the parsers' order: the actions that take a value (no -h, no switch), named by
    option string (positionals by their dest), the last definition of a name winning
    (textteacher.py's pre-parser of --data and --preset, then its full parser)."""
    mine = [p for p, caller, _ in parsers_of(module, monkeypatch, things)
            if caller != "textteacher" or module.__name__ == "textteacher"]
    flags = {}
    for parser in mine:
        for a in parser._actions:
            if a.nargs != 0:
                flags[max(a.option_strings, key=len) if a.option_strings else a.dest] = a
    return mine, flags


def declared(action):
    """What the flag declares it takes: "number", "path", "some", "device", "names", "choice",
    "text" or None."""
    kind = action.type
    for attribute, what in (("allowed", "number"), ("path_kind", "path"), ("options", "some"),
                            ("kinds", "device"), ("form", "names")):
        if hasattr(kind, attribute):
            return what
    return "choice" if action.choices is not None else "text" if kind is str else None


def bad_values(action, things):
    """The values the flag must refuse, by what it declares; values its declaration allows
    (a 0 where 0 is in range, "" where it means none) are left out by asking it."""
    what, kind = declared(action), action.type
    if what == "number":
        def allowed(text):
            try:
                return cli.within(kind.kind(text), kind.allowed)
            except ValueError:
                return False
        return [v for v in NUMBERS if not allowed(v)]
    if what == "choice":
        return [NOT_A_CHOICE]
    if what == "device":  # not a device, and a GPU no machine has
        return [NOT_A_CHOICE, "cuda:99"]
    if what == "some":
        return [NOT_A_CHOICE, f"{kind.options[0]},{NOT_A_CHOICE}"]
    if what == "names":  # one name too few, one too many, an empty one
        n = kind.form.count(",") + 1
        return [",".join(["a"] * (n - 1)), ",".join(["a"] * (n + 1)), ",".join(["a"] * n) + ", "]
    if what == "path":
        # the rules of a path, written here and not taken from cli.path: the test's own
        wanted, reads = kind.path_kind.replace("new ", ""), not kind.path_kind.startswith("new ")
        values = [os.path.join(things, "file", "under")]  # a file where a folder must be
        values += [os.path.join(things, "no-such", "path")] if reads else []
        values += [os.path.join(things, "folder")] if "folder" not in wanted else []
        values += [os.path.join(things, "file")] if "file" not in wanted else []
        try:
            kind("")  # "" may mean none (compare.py's --teacher): its declaration says
        except argparse.ArgumentTypeError:
            values.append("")
        return values
    return []


def minimal(action, things):
    """A value the flag takes, for a required one that is not under test."""
    what, kind = declared(action), action.type
    if what == "number":
        return next(v for v in ("1", "2", "0") if cli.within(kind.kind(v), kind.allowed))
    if what == "choice":
        return str(action.choices[0])
    if what in ("some", "device"):
        return (kind.options if what == "some" else kind.kinds)[0]
    if what == "names":
        return kind.form
    if what == "path" and kind.path_kind.startswith("new "):
        return "made-here"  # in the working folder, where nothing may appear
    if what == "path":
        return os.path.join(things, "file" if kind.path_kind == "file" else "folder")
    return "x"


def argv_for(parsers, flags, flag, value, things):
    """The command line: flag's value, and a value for each other required flag (one of each
    required group), positionals first in their order (a parser that passes on what it does
    not know would take the value of an unknown flag for a positional)."""
    under = flags[flag]
    options, positionals = [flag, value] if under.option_strings else [], []
    for name, a in flags.items():
        if a is under:
            if not a.option_strings:
                positionals.append(value)
            continue
        grouped = any(a in g._group_actions for p in parsers
                      for g in p._mutually_exclusive_groups)
        if not a.option_strings:
            positionals.append(minimal(a, things))
        elif a.required and not grouped:
            options += [name, minimal(a, things)]
    for group in (g for p in parsers for g in p._mutually_exclusive_groups if g.required):
        if under not in group._group_actions:
            a = group._group_actions[0]
            options += [max(a.option_strings, key=len), minimal(a, things)]
    return positionals + options


def listing(folder):
    """Every file and folder under folder, with the size of each file."""
    out = []
    for where, folders, files in os.walk(folder):
        out += [(os.path.relpath(os.path.join(where, d), folder), "folder") for d in folders]
        out += [(os.path.relpath(os.path.join(where, f), folder),
                 os.path.getsize(os.path.join(where, f))) for f in files]
    return sorted(out)


class TooLong(BaseException):
    """A command still running at the alarm (not an Exception: no handler of its may keep it)."""


def what_is_wrong(module, argv, flag, places, capsys):
    """Why the command does not refuse argv as every bad flag must be refused (None: it does)."""
    before = [listing(p) for p in places]
    capsys.readouterr()

    def alarm(signum, frame):
        raise TooLong

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, 2 * SECONDS)  # a started run is stopped, not waited
    start = time.monotonic()
    try:
        cli.run(module.main, argv)
        code = 0
    except SystemExit as e:
        code = e.code
    except TooLong:
        return f"still running after {2 * SECONDS} s"
    except Exception as e:  # out of cli.run: a traceback, for the user
        return f"a traceback ({type(e).__name__}: {e})"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    seconds, err = time.monotonic() - start, capsys.readouterr().err
    lines = err.strip().splitlines()
    if code in (0, None):
        return f"exit code {code}: accepted"
    if seconds > SECONDS:
        return f"{seconds:.1f} s before it ended"
    if "Traceback" in err or len(lines) > 2:
        return f"{len(lines)} lines on stderr: {err!r}"
    if not re.search(re.escape(flag) + r"(?![\w-])", err):
        return f"the flag is not named: {err!r}"
    if [listing(p) for p in places] != before:
        return f"wrote something: {err!r}"
    return None


@pytest.fixture(scope="module")
def things(tmp_path_factory):
    """What the bad paths point at: a file, and an empty folder."""
    base = tmp_path_factory.mktemp("things")
    (base / "file").write_text("not what any flag reads\n")
    (base / "folder").mkdir()
    return str(base)


def test_the_walk_finds_every_flag_of_the_trainer(things, monkeypatch):
    """The walk itself, where the flags are known another way: textteacher.py makes one from
    each field of its Config, and those that take a value are what the walk must find."""
    _, flags = own_flags(command("textteacher.py"), monkeypatch, things)
    assert set(flags) == {"--" + f.name.replace("_", "-") for f in
                          dataclasses.fields(textteacher.Config) if f.type is not bool}


@pytest.mark.parametrize("script", COMMANDS)
def test_every_flag_declares_what_it_takes(script, things, monkeypatch):
    """A number its range, a path its kind, a word its choices; free text says type=str. What
    declares nothing is a flag this walk would silently pass over."""
    _, flags = own_flags(command(script), monkeypatch, things)
    undeclared = [f for f, a in flags.items() if declared(a) is None]
    assert not undeclared, f"declare with cli.number, cli.path, cli.some_of, choices or " \
        f"type=str: {', '.join(undeclared)}"


@pytest.mark.parametrize("script", COMMANDS)
def test_the_trainers_flags_pass_through_untouched(script, things, monkeypatch):
    """A parser of a script's own flags that passes on the others (parse_known_args, to
    textteacher.parse_config) leaves every flag of the trainer's to it: an abbreviation took
    --seed for compare.py's --seeds, which then ran that many seeds from seed 0. (A parser of
    the trainer's flags alone, compare.need_inputs's, only checks them.)"""
    module = command(script)
    trainers = {o for p in own_flags(command("textteacher.py"), monkeypatch, things)[0]
                for a in p._actions if not isinstance(a, argparse._HelpAction)
                for o in a.option_strings if o.startswith("--")}
    passing = [p for p, caller, known in parsers_of(module, monkeypatch, things)
               if caller == module.__name__ and known and {
                   o for a in p._actions for o in a.option_strings} - trainers]
    if script == "textteacher.py" or not passing:
        pytest.skip("passes no flags on")
    for parser in passing:
        positionals = [minimal(a, things) for a in parser._actions if not a.option_strings]
        taken = [o for o in sorted(trainers)
                 if f"{o}=1" not in parser.parse_known_args(positionals + [f"{o}=1"])[1]]
        assert not taken, f"{script} takes the trainer's {', '.join(taken)} for its own"


@pytest.mark.parametrize("script", COMMANDS)
def test_every_bad_value_of_every_flag_is_one_line_before_any_work(script, things, tmp_path,
                                                                   monkeypatch, capsys):
    """Each bad value in turn, the other flags minimal (a value for each required one): all
    that is wrong is listed at once, as the command line and what went wrong with it."""
    module = command(script)
    parsers, flags = own_flags(module, monkeypatch, things)
    monkeypatch.chdir(tmp_path)  # relative defaults (runs/, docs/, data/) land here
    wrong, tried = [], 0
    for flag, action in flags.items():
        for value in bad_values(action, things):
            argv = argv_for(parsers, flags, flag, value, things)
            why = what_is_wrong(module, argv, flag, [str(tmp_path), things], capsys)
            tried += 1
            if why:
                wrong.append(f"{' '.join(argv)}: {why}")
    assert not wrong, "\n".join(wrong)
    print(f"{script}: {tried} bad values of {len(flags)} flags refused")


@pytest.mark.parametrize("augment", ["3aug", "crop", "none"])
def test_the_smallest_image_size_the_trainer_declares_trains(augment, tmp_path):
    """The lower end of --img-size (5 px: the padded crop reflects 4 px, which needs a side of
    5) trains with every augmentation, where 1-4 px once crashed in the crop: a range declares
    what the code can take, its ends included."""
    from common import run, write_folder
    lo = int(textteacher.Config.__dataclass_fields__["img_size"].metadata["allowed"][1:].split(
        ",")[0])
    assert lo == 5
    root = str(tmp_path / "d")
    write_folder(root, train=4, val=1, size=(7, 9))
    assert run(["--data", root, "--img-size", lo, "--patch-size", lo, "--model", "micro",
                "--batch-size", "4", "--epochs", "1", "--threads", "1", "--workers", "0",
                "--augment", augment, "--out-dir", tmp_path, "--name", "r"]) == 0


def test_the_smallest_size_the_loader_benchmark_declares_runs(capsys):
    """benchmarks/loader.py --size at its lower end (5 px), on 1 px wide images (its --width's)."""
    import loader
    loader.main(["--size", "5", "--width", "1", "--height", "5", "--images", "2", "--rounds",
                 "1"])
    out = capsys.readouterr().out
    assert out.startswith("2 JPEGs of 1 x 5 to 5 px") and "vs deit3" in out


def range_ends(field):
    """The ends of a numeric field's declared range that the range includes: a bracket's end,
    and for an integer the last integer before a parenthesis; infinities are no end."""
    allowed = field.metadata["allowed"]
    if not isinstance(allowed, str) or field.type not in (int, float):
        return []
    lo, hi = (float(x) for x in allowed[1:-1].split(","))
    ends = [(lo if allowed[0] == "[" else lo + 1 if field.type is int else None),
            (hi if allowed[-1] == "]" else hi - 1 if field.type is int else None)]
    return [field.type(e) for e in ends if e is not None and math.isfinite(e)]


# Upper ends no test can run to the end: they are checked to be taken by the parser only
UNRUNNABLE = {"epochs": "100000 epochs", "workers": "256 loader processes",
              "patch_size": "a 1024 px patch (and image): a patch projection of 400M weights"}


def test_every_range_end_of_the_trainer_is_taken_or_refused_in_one_line(tmp_path, capsys):
    """A declared range is what the code can take (the ends of --img-size and of the loader's
    --size once crashed). Every included end of every numeric flag of the trainer, walked from
    Config: all lower ends together in one run, which must train; each upper end in a run of
    its own, which must train or be refused in one line (more memory than the machine has, a
    batch larger than the data set) -- never a traceback."""
    from common import run, write_folder
    root = str(tmp_path / "d")
    write_folder(root, train=4, val=1, size=(7, 9))
    base = ["--data", root, "--model", "micro", "--epochs", "1", "--batch-size", "4",
            "--img-size", "8", "--patch-size", "4", "--threads", "1", "--workers", "0",
            "--out-dir", str(tmp_path)]
    fields = {f.name: range_ends(f) for f in dataclasses.fields(textteacher.Config)}
    flag = {name: "--" + name.replace("_", "-") for name in fields}
    lower = [x for name, ends in fields.items() if ends for x in (flag[name], ends[0])]
    assert "--img-size" in lower and "--seed" in lower and len(lower) >= 2 * 15
    capsys.readouterr()
    assert run(base + lower + ["--name", "lower"]) == 0, capsys.readouterr().err
    for name, ends in fields.items():
        if len(ends) < 2 or ends[0] == ends[1]:
            continue
        argv = [str(a) for a in base + [flag[name], ends[1], "--name", name]]
        if name in UNRUNNABLE:
            assert getattr(textteacher.parse_config(argv)[0], name) == ends[1], UNRUNNABLE[name]
            continue
        capsys.readouterr()
        code, err = run(argv), capsys.readouterr().err
        assert code == 0 or (code == 2 and len(err.strip().splitlines()) == 1
                             and "Traceback" not in err), (name, ends[1], err)
