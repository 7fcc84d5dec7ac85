"""linux.seccomp: the spec's filter, checked, then compiled to a classic BPF program for the guest's x86_64
kernel, as libseccomp compiles one for runc. The agent installs it just before the process's execve, for
the container's init and for every exec in the container (docs/protocol.md, record `seccomp`).

The guest kernel runs x86_64 code alone: the other architectures a spec lists (x86, x32, arm64, ...) have
nothing to filter there, and a call of another ABI meets the filter's default action."""
import dataclasses
import struct

from ..errors import PyrunvError
from .syscalls import X86_64

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
EPERM = 1
ACTIONS = {"SCMP_ACT_KILL": 0x00000000, "SCMP_ACT_KILL_THREAD": 0x00000000, "SCMP_ACT_KILL_PROCESS": 0x80000000,
           "SCMP_ACT_TRAP": 0x00030000, "SCMP_ACT_ERRNO": 0x00050000, "SCMP_ACT_TRACE": 0x7FF00000,
           "SCMP_ACT_LOG": 0x7FFC0000, "SCMP_ACT_ALLOW": 0x7FFF0000}
WITH_ERRNO = ("SCMP_ACT_ERRNO", "SCMP_ACT_TRACE")  # their return value carries errnoRet
OPERATORS = ("SCMP_CMP_NE", "SCMP_CMP_LT", "SCMP_CMP_LE", "SCMP_CMP_EQ", "SCMP_CMP_GE", "SCMP_CMP_GT",
             "SCMP_CMP_MASKED_EQ")
FLAGS = {"SECCOMP_FILTER_FLAG_TSYNC": 1, "SECCOMP_FILTER_FLAG_LOG": 2, "SECCOMP_FILTER_FLAG_SPEC_ALLOW": 4}
ARCHITECTURES = ("SCMP_ARCH_X86", "SCMP_ARCH_X86_64", "SCMP_ARCH_X32", "SCMP_ARCH_ARM", "SCMP_ARCH_AARCH64",
                 "SCMP_ARCH_MIPS", "SCMP_ARCH_MIPS64", "SCMP_ARCH_MIPS64N32", "SCMP_ARCH_MIPSEL", "SCMP_ARCH_MIPSEL64",
                 "SCMP_ARCH_MIPSEL64N32", "SCMP_ARCH_PPC", "SCMP_ARCH_PPC64", "SCMP_ARCH_PPC64LE", "SCMP_ARCH_S390",
                 "SCMP_ARCH_S390X", "SCMP_ARCH_PARISC", "SCMP_ARCH_PARISC64", "SCMP_ARCH_RISCV64",
                 "SCMP_ARCH_LOONGARCH64", "SCMP_ARCH_M68K", "SCMP_ARCH_SH", "SCMP_ARCH_SHEB")
U64 = (1 << 64) - 1


@dataclasses.dataclass(frozen=True)
class Rule:
    number: int
    action: int    # the filter's return value: the action with its data
    args: tuple    # (index, operator, value, value_two), all of which must hold


@dataclasses.dataclass(frozen=True)
class Filter:
    default: int
    flags: int
    rules: tuple   # Rule, in the spec's order: the first that matches decides


def parse(seccomp: dict) -> Filter:
    """The spec's linux.seccomp, checked; syscalls this kernel does not know are left out, as runc does."""
    where = "invalid config.json: linux.seccomp"
    if not isinstance(seccomp, dict):
        raise PyrunvError(f"{where}: not an object")
    default = _action(seccomp.get("defaultAction"), seccomp.get("defaultErrnoRet"), f"{where}.defaultAction")
    for arch in _list(seccomp.get("architectures", []), f"{where}.architectures"):
        if arch not in ARCHITECTURES:
            raise PyrunvError(f"{where}.architectures: unknown architecture {arch!r}")
    flags = 0
    for flag in _list(seccomp.get("flags", []), f"{where}.flags"):
        if flag not in FLAGS:
            raise PyrunvError(f"{where}.flags: unknown flag {flag!r}")
        flags |= FLAGS[flag]
    rules = []
    for i, syscall in enumerate(_list(seccomp.get("syscalls", []), f"{where}.syscalls")):
        here = f"{where}.syscalls[{i}]"
        if not isinstance(syscall, dict):
            raise PyrunvError(f"{here}: not an object")
        action = _action(syscall.get("action"), syscall.get("errnoRet"), f"{here}.action")
        args = tuple(_argument(arg, f"{here}.args[{j}]")
                     for j, arg in enumerate(_list(syscall.get("args", []), f"{here}.args")))
        names = _list(syscall.get("names"), f"{here}.names")
        if not names or not all(isinstance(name, str) for name in names):
            raise PyrunvError(f"{here}.names: a list of syscall names")
        if action != default:  # libseccomp refuses such a rule and runc leaves it out: it changes nothing
            rules += [Rule(X86_64[name], action, args) for name in names if name in X86_64]
    return Filter(default, flags, tuple(rules))


def _list(value, where: str) -> list:
    if not isinstance(value, list):
        raise PyrunvError(f"{where}: not a list")
    return value


def _action(name, errno_ret, where: str) -> int:
    if name not in ACTIONS:
        raise PyrunvError(f"{where}: unknown action {name!r}" + (" (a notify listener is not supported)"
                                                                 if name == "SCMP_ACT_NOTIFY" else ""))
    if name not in WITH_ERRNO:
        return ACTIONS[name]
    errno_ret = EPERM if errno_ret is None else errno_ret
    if not isinstance(errno_ret, int) or isinstance(errno_ret, bool) or not 0 <= errno_ret <= 0xFFFF:
        raise PyrunvError(f"{where}: errnoRet {errno_ret!r} is not an errno")
    return ACTIONS[name] | errno_ret


def _argument(arg, where: str) -> tuple:
    if not isinstance(arg, dict):
        raise PyrunvError(f"{where}: not an object")
    index, op = arg.get("index"), arg.get("op")
    value, value_two = arg.get("value", 0), arg.get("valueTwo", 0)
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index <= 5:
        raise PyrunvError(f"{where}.index: {index!r} is not an argument's index (0 to 5)")
    if op not in OPERATORS:
        raise PyrunvError(f"{where}.op: unknown operator {op!r}")
    for name, number in (("value", value), ("valueTwo", value_two)):
        if not isinstance(number, int) or isinstance(number, bool) or not 0 <= number <= U64:
            raise PyrunvError(f"{where}.{name}: {number!r} is not a 64-bit unsigned number")
    return index, op, value, value_two


# Classic BPF, as seccomp runs it: A is the accumulator; jumps are relative to the next instruction.
LD_ABS, AND_K, JA, JEQ, JGT, JGE, RET_K = 0x20, 0x54, 0x05, 0x15, 0x25, 0x35, 0x06
NR, ARCH, ARGS = 0, 4, 16  # offsets in struct seccomp_data
LEAF = 8  # syscalls compared one after another at the foot of the search tree


class _Program:
    """Instructions with symbolic jump targets, resolved once the whole program is laid out."""

    def __init__(self):
        self.code, self.labels = [], {}

    @staticmethod
    def label() -> object:
        return object()

    def place(self, label) -> None:
        self.labels[label] = len(self.code)

    def emit(self, op: int, k: int = 0, jt=0, jf=0) -> None:
        self.code.append((op, jt, jf, k))

    def assemble(self) -> bytes:
        out = []
        for i, (op, jt, jf, k) in enumerate(self.code):
            jt, jf = (self.labels[j] - i - 1 if not isinstance(j, int) else j for j in (jt, jf))
            if op == JA and not isinstance(k, int):
                k = self.labels[k] - i - 1
            if not (0 <= jt <= 255 and 0 <= jf <= 255):
                raise PyrunvError("linux.seccomp: a rule too large to compile")
            out.append(struct.pack("<HBBI", op, jt, jf, k))
        return b"".join(out)


def to_bpf(policy: Filter) -> bytes:
    """The program: the architecture's check, then a search tree over the syscall numbers whose leaves try
    each number's rules in order; whatever no rule decides gets the default action, x32's calls too."""
    program = _Program()
    program.emit(LD_ABS, ARCH)
    program.emit(JEQ, AUDIT_ARCH_X86_64, 1, 0)
    program.emit(RET_K, policy.default)
    program.emit(LD_ABS, NR)
    program.emit(JGE, X32_SYSCALL_BIT, 0, 1)
    program.emit(RET_K, policy.default)
    by_number: dict[int, list] = {}
    for rule in policy.rules:
        by_number.setdefault(rule.number, []).append(rule)
    _tree(program, sorted(by_number.items()), policy.default)
    return program.assemble()


def _tree(program: _Program, numbers: list, default: int) -> None:
    """Compares A (the syscall's number) down to a leaf; A is kept until a number's rules load arguments."""
    if len(numbers) > LEAF:
        middle = len(numbers) // 2
        upper = program.label()
        program.emit(JGE, numbers[middle][0], 0, 1)
        program.emit(JA, upper)
        _tree(program, numbers[:middle], default)
        program.place(upper)
        _tree(program, numbers[middle:], default)
        return
    for number, rules in numbers:
        other = program.label()
        program.emit(JEQ, number, 0, other)
        for rule in rules:
            next_rule = program.label()
            for index, op, value, value_two in rule.args:
                _compare(program, index, op, value, value_two, next_rule)
            program.emit(RET_K, rule.action)
            program.place(next_rule)
        program.emit(RET_K, default)
        program.place(other)
    program.emit(RET_K, default)


def _compare(program: _Program, index: int, op: str, value: int, value_two: int, fail) -> None:
    """Falls through if the 64-bit argument compares as op says (unsigned, as libseccomp compares), else jumps
    to fail. The high half is compared first: the low half decides only where the high halves are equal."""
    high, low = ARGS + 8 * index + 4, ARGS + 8 * index
    if op == "SCMP_CMP_MASKED_EQ":
        for offset, shift in ((high, 32), (low, 0)):
            program.emit(LD_ABS, offset)
            program.emit(AND_K, (value >> shift) & 0xFFFFFFFF)
            program.emit(JEQ, (value_two >> shift) & 0xFFFFFFFF, 0, fail)
        return
    negated = {"SCMP_CMP_NE": "SCMP_CMP_EQ", "SCMP_CMP_LT": "SCMP_CMP_GE", "SCMP_CMP_LE": "SCMP_CMP_GT"}
    if op in negated:  # the opposite comparison, with its outcomes swapped
        passed = program.label()
        _compare_to(program, high, low, negated[op], value, fail_to=passed, pass_to=fail)
        program.place(passed)
        return
    passed = program.label()
    _compare_to(program, high, low, op, value, fail_to=fail, pass_to=passed)
    program.place(passed)


def _compare_to(program: _Program, high: int, low: int, op: str, value: int, fail_to, pass_to) -> None:
    """EQ, GT or GE of the argument against value: jumps to pass_to or fail_to."""
    value_high, value_low = value >> 32, value & 0xFFFFFFFF
    program.emit(LD_ABS, high)
    if op == "SCMP_CMP_EQ":
        program.emit(JEQ, value_high, 0, fail_to)
    else:
        program.emit(JGT, value_high, pass_to, 0)
        program.emit(JEQ, value_high, 0, fail_to)
    program.emit(LD_ABS, low)
    program.emit({"SCMP_CMP_EQ": JEQ, "SCMP_CMP_GT": JGT, "SCMP_CMP_GE": JGE}[op], value_low, pass_to, fail_to)
