"""linux.seccomp compiled to BPF: the program's decisions, run by a classic-BPF interpreter written here from
the kernel's rules, for calls that a rule or the default must decide; and the spec's errors, one line each."""
import struct

import pytest

from pyrunv.errors import PyrunvError
from pyrunv.oci import seccomp
from pyrunv.oci.syscalls import X86_64

ALLOW, KILL_PROCESS = 0x7FFF0000, 0x80000000
ERRNO = 0x00050000


def run(program: bytes, number: int, args=(0,) * 6, arch=seccomp.AUDIT_ARCH_X86_64) -> int:
    """What the kernel's seccomp would return for this call: the classic BPF the compiler emits."""
    data = struct.pack("<iIQ6Q", number, arch, 0, *(list(args) + [0] * (6 - len(args))))
    code = [struct.unpack("<HBBI", program[i:i + 8]) for i in range(0, len(program), 8)]
    assert len(code) <= 4096, "longer than the kernel takes (BPF_MAXINSNS)"
    a, pc = 0, 0
    while True:
        op, jt, jf, k = code[pc]
        pc += 1
        if op == seccomp.LD_ABS:
            a = struct.unpack_from("<I", data, k)[0]
        elif op == seccomp.AND_K:
            a &= k
        elif op == seccomp.JA:
            pc += k
        elif op in (seccomp.JEQ, seccomp.JGT, seccomp.JGE):
            taken = {seccomp.JEQ: a == k, seccomp.JGT: a > k, seccomp.JGE: a >= k}[op]
            pc += jt if taken else jf
        elif op == seccomp.RET_K:
            return k
        else:
            raise AssertionError(f"instruction {op:#x} the compiler should not emit")


def compiled(syscalls, default="SCMP_ACT_ERRNO", **more) -> bytes:
    return seccomp.to_bpf(seccomp.parse({"defaultAction": default, "syscalls": syscalls, **more}))


def test_an_allow_list_allows_its_calls_and_refuses_the_rest_with_the_default_errno():
    names = sorted(X86_64, key=X86_64.get)[::2]  # every other syscall: a deep tree
    program = compiled([{"names": names, "action": "SCMP_ACT_ALLOW"}], defaultErrnoRet=38)
    for name, number in X86_64.items():
        assert run(program, number) == (ALLOW if name in names else ERRNO | 38), name


def test_a_deny_list_with_errno_and_the_default_allow():
    program = compiled([{"names": ["sethostname", "setdomainname"], "action": "SCMP_ACT_ERRNO"},
                        {"names": ["reboot"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13}], default="SCMP_ACT_ALLOW")
    assert run(program, X86_64["sethostname"]) == ERRNO | 1  # EPERM unless the rule says
    assert run(program, X86_64["reboot"]) == ERRNO | 13
    assert run(program, X86_64["read"]) == ALLOW


def test_another_architecture_and_x32_calls_meet_the_default():
    program = compiled([{"names": ["read"], "action": "SCMP_ACT_ALLOW"}], default="SCMP_ACT_KILL_PROCESS")
    assert run(program, 0) == ALLOW
    assert run(program, 0, arch=0x40000003) == KILL_PROCESS  # i386
    assert run(program, 0 | seccomp.X32_SYSCALL_BIT) == KILL_PROCESS


@pytest.mark.parametrize("op, value, value_two, passes, fails", [
    ("SCMP_CMP_EQ", 8, 0, [8], [0, 9, 8 | 1 << 32]),
    ("SCMP_CMP_NE", 8, 0, [0, 9, 8 | 1 << 32], [8]),
    ("SCMP_CMP_GT", 1 << 32, 0, [(1 << 32) + 1, 2 << 32], [1 << 32, 5, 0xFFFFFFFF]),
    ("SCMP_CMP_GE", 1 << 32, 0, [1 << 32, 2 << 32], [0xFFFFFFFF, 0]),
    ("SCMP_CMP_LT", 1 << 32, 0, [0xFFFFFFFF, 0], [1 << 32, (1 << 32) + 1]),
    ("SCMP_CMP_LE", 7, 0, [7, 0], [8, 7 | 1 << 32]),
    ("SCMP_CMP_MASKED_EQ", 0xFF00000000FF, 0x120000000034, [0x120000000034, 0xAB120000000034], [0x34, 0x12 << 40]),
])
def test_an_argument_compares_as_a_64_bit_unsigned_number(op, value, value_two, passes, fails):
    program = compiled([{"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                         "args": [{"index": 1, "value": value, "valueTwo": value_two, "op": op}]}])
    for arg in passes:
        assert run(program, X86_64["personality"], (0, arg)) == ALLOW, hex(arg)
    for arg in fails:
        assert run(program, X86_64["personality"], (0, arg)) == ERRNO | 1, hex(arg)


def test_rules_of_one_syscall_are_tried_in_order_and_all_of_a_rules_arguments_must_hold():
    program = compiled([
        {"names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": 22,
         "args": [{"index": 0, "value": 0x10000000, "op": "SCMP_CMP_MASKED_EQ", "valueTwo": 0x10000000}]},
        {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 1, "value": 0, "op": "SCMP_CMP_EQ"}, {"index": 2, "value": 3, "op": "SCMP_CMP_LE"}]}])
    clone = X86_64["clone"]
    assert run(program, clone, (0x10000000, 0, 0)) == ERRNO | 22
    assert run(program, clone, (0x11, 0, 3)) == ALLOW
    assert run(program, clone, (0x11, 0, 4)) == ERRNO | 1
    assert run(program, clone, (0x11, 1, 0)) == ERRNO | 1


def test_flags_and_unknown_syscalls():
    policy = seccomp.parse({"defaultAction": "SCMP_ACT_ALLOW", "flags": ["SECCOMP_FILTER_FLAG_LOG"],
                            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
                            "syscalls": [{"names": ["no_such_call", "uname"], "action": "SCMP_ACT_KILL"}]})
    assert policy.flags == 2 and [r.number for r in policy.rules] == [X86_64["uname"]]


@pytest.mark.parametrize("document, line", [
    ({"defaultAction": "SCMP_ACT_NOPE"}, "linux.seccomp.defaultAction: unknown action 'SCMP_ACT_NOPE'"),
    ({"defaultAction": "SCMP_ACT_NOTIFY"},
     "linux.seccomp.defaultAction: unknown action 'SCMP_ACT_NOTIFY' (a notify listener is not supported)"),
    ({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": -1},
     "linux.seccomp.defaultAction: errnoRet -1 is not an errno"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_Z80"]},
     "linux.seccomp.architectures: unknown architecture 'SCMP_ARCH_Z80'"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "flags": ["SECCOMP_FILTER_FLAG_NEW_LISTENER"]},
     "linux.seccomp.flags: unknown flag 'SECCOMP_FILTER_FLAG_NEW_LISTENER'"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": [], "action": "SCMP_ACT_KILL"}]},
     "linux.seccomp.syscalls[0].names: a list of syscall names"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_KILL",
                                                       "args": [{"index": 6, "value": 0, "op": "SCMP_CMP_EQ"}]}]},
     "linux.seccomp.syscalls[0].args[0].index: 6 is not an argument's index (0 to 5)"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_KILL",
                                                       "args": [{"index": 0, "value": -1, "op": "SCMP_CMP_EQ"}]}]},
     "linux.seccomp.syscalls[0].args[0].value: -1 is not a 64-bit unsigned number"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_KILL",
                                                       "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_XOR"}]}]},
     "linux.seccomp.syscalls[0].args[0].op: unknown operator 'SCMP_CMP_XOR'"),
])
def test_a_bad_filter_is_one_line_naming_its_field(document, line):
    with pytest.raises(PyrunvError) as refused:
        seccomp.parse(document)
    assert str(refused.value) == f"invalid config.json: {line}"
