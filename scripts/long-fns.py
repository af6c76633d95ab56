#!/usr/bin/env python3
"""Lists non-test Rust functions longer than a limit (default 120 lines).

Usage: scripts/long-fns.py [LIMIT] [ROOT...]   (exit 1 when any is found)

Test code is skipped: files under tests/, benches/ or examples/, and items
inside a `#[cfg(test)]` module. Brace matching ignores strings, chars and
comments well enough for this codebase's style.
"""
import os
import re
import sys

FN = re.compile(r'^\s*(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?(extern\s+"[^"]*"\s+)?fn\s+(\w+)')


def strip(line, state):
    """Removes string/char literals and comments; state carries block comments."""
    out, i, n = [], 0, len(line)
    while i < n:
        if state['block']:
            j = line.find('*/', i)
            if j < 0:
                return ''.join(out)
            state['block'] = False
            i = j + 2
            continue
        if state['raw'] is not None:
            end = '"' + '#' * state['raw']
            j = line.find(end, i)
            if j < 0:
                return ''.join(out)
            state['raw'] = None
            i = j + len(end)
            continue
        if state['str']:
            while i < n:
                if line[i] == '\\':
                    i += 2
                    continue
                if line[i] == '"':
                    state['str'] = False
                    i += 1
                    break
                i += 1
            continue
        c = line[i]
        if line.startswith('//', i):
            break
        if line.startswith('/*', i):
            state['block'] = True
            i += 2
            continue
        m = re.match(r'b?r(#*)"', line[i:])
        if m and (i == 0 or not (line[i - 1].isalnum() or line[i - 1] == '_')):
            state['raw'] = len(m.group(1))
            i += m.end()
            continue
        if c == '"':
            state['str'] = True
            i += 1
            continue
        if c == "'":
            m = re.match(r"'(\\.|[^\\'])'", line[i:]) or re.match(r"'\\u\{[0-9a-fA-F]+\}'", line[i:])
            if m:
                i += m.end()
                continue
        out.append(c)
        i += 1
    return ''.join(out)


def scan(path, limit, found):
    with open(path, encoding='utf-8', errors='replace') as f:
        lines = f.read().split('\n')
    state = {'block': False, 'str': False, 'raw': None}
    depth = 0
    test_depth = None  # depth at which a cfg(test) module opened
    pending_test = False
    stack = []  # (name, start_line, depth_before)
    for no, raw in enumerate(lines, 1):
        code = strip(raw, state)
        if re.match(r'\s*#\[cfg\(test\)\]', raw):
            pending_test = True
        m = FN.match(code)
        if m and test_depth is None and not pending_test:
            stack.append([m.group(7), no, depth, False])
        if pending_test and re.match(r'\s*(pub\s+)?mod\s+\w+', code) and '{' in code:
            test_depth = depth
            pending_test = False
        elif pending_test and code.strip() and not code.strip().startswith('#'):
            if not re.match(r'\s*(pub\s+)?mod\s+\w+\s*$', code):
                pending_test = False
        for ch in code:
            if ch == '{':
                depth += 1
                if stack and not stack[-1][3] and depth == stack[-1][2] + 1:
                    stack[-1][3] = True
            elif ch == '}':
                depth -= 1
                if stack and stack[-1][3] and depth == stack[-1][2]:
                    name, start, _, _ = stack.pop()
                    size = no - start + 1
                    if size > limit:
                        found.append((size, path, start, name))
                if test_depth is not None and depth == test_depth:
                    test_depth = None
            elif ch == ';' and stack and not stack[-1][3] and depth == stack[-1][2]:
                stack.pop()  # a declaration without a body


def main():
    args = sys.argv[1:]
    limit = 120
    if args and args[0].isdigit():
        limit = int(args.pop(0))
    roots = args or ['crates', 'fixtures/src']
    found = []
    for root in roots:
        for d, dirs, files in os.walk(root):
            parts = d.split(os.sep)
            if any(p in ('tests', 'benches', 'examples', 'target', 'fuzz') for p in parts):
                continue
            for fn in files:
                if fn.endswith('.rs'):
                    scan(os.path.join(d, fn), limit, found)
    for size, path, start, name in sorted(found, reverse=True):
        print(f'{size:5} {path}:{start} {name}')
    print(f'{len(found)} non-test functions over {limit} lines', file=sys.stderr)
    sys.exit(1 if found else 0)


if __name__ == '__main__':
    main()
