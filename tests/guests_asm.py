"""Small assembly guests for machine tests (the C guests live in guests/)."""

# Read-modify-write heavy: a double-executed instruction after an inexact stop would change every result.
RMW_LOOP = """
  xor r15, r15
  mov r14, 300000
  mov rsi, 0x200000
1:
  add rax, r15
  add [rsi + 0x10], rax
  inc qword ptr [rsi + 0x18]
  xadd [rsi + 0x20], rax
  add rbx, [rsi + 0x10]
  mov rcx, r15
  and rcx, 0x3ff
  add [rsi + rcx*8 + 0x1000], rbx
  inc r15
  test r15, 0xfff
  jnz 2f
  mov rdx, r15
  shr rdx, 12
  and dl, 15
  add dl, 0x61
  mov al, dl
  mov dx, 0x3f8
  out dx, al
2:
  cmp r15, r14
  jne 1b
  mov eax, ebx
  and eax, 0x7f
  mov dx, 0x500
  out dx, eax
  hlt
"""
