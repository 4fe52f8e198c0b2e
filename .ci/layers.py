#!/usr/bin/env python3
"""Checks that the crate's modules import each other in no circle and that every
import between layers points the way docs/architecture.md says. Reads src/ as text:
`use` lines and `crate::`/`super::` paths outside tests and comments."""
import re,glob,os,sys
mods={}
for f in glob.glob('src/**/*.rs',recursive=True):
    if f.startswith('src/bin'): continue
    p=f[4:-3].split('/')
    if p[-1] in ('mod','lib'): p=p[:-1]
    mods['::'.join(p)]=f
def resolve(path, cur):
    parts=path.split('::')
    if parts[0]=='crate': base=[]; parts=parts[1:]
    elif parts[0]=='super': base=cur.split('::')[:-1] if cur else []; parts=parts[1:]
    elif parts[0]=='self': base=cur.split('::') if cur else []; parts=parts[1:]
    else: return None
    while parts and parts[0]=='super': base=base[:-1]; parts=parts[1:]
    best=None
    for i in range(len(parts),-1,-1):
        m='::'.join(base+parts[:i])
        if m in mods: best=m; break
    return best
edges={}
for m,f in mods.items():
    s=open(f).read()
    s=re.sub(r'#\[cfg\(test\)\]\s*mod tests \{.*','',s,flags=re.S)
    s='\n'.join(l for l in s.split('\n') if not l.strip().startswith('//'))
    for path in re.findall(r'\b((?:crate|super|self)(?:::\w+)+)',s):
        t=resolve(path,m)
        if t is not None and t!=m and not t.startswith(m+'::') and not m.startswith(t+'::' ) and t!='':
            edges.setdefault(m,set()).add(t)
    # use super::{a, b}
    for grp in re.findall(r'use (super|crate)::\{([^}]*)\}',s):
        for it in grp[1].split(','):
            it=it.strip().split(' ')[0]
            if not it: continue
            t=resolve(grp[0]+'::'+it,m)
            if t and t!=m and not t.startswith(m+'::') and not m.startswith(t+'::') and t!='':
                edges.setdefault(m,set()).add(t)
# Tarjan SCC
idx={};low={};st=[];on=set();sccs=[];c=[0]
sys.setrecursionlimit(10000)
def sc(v):
    idx[v]=low[v]=c[0];c[0]+=1;st.append(v);on.add(v)
    for w in edges.get(v,()):
        if w not in idx: sc(w);low[v]=min(low[v],low[w])
        elif w in on: low[v]=min(low[v],idx[w])
    if low[v]==idx[v]:
        comp=[]
        while True:
            w=st.pop();on.discard(w);comp.append(w)
            if w==v:break
        sccs.append(comp)
for v in mods:
    if v not in idx: sc(v)
cycles = [sorted(c) for c in sccs if len(c) > 1]
# Which layers each layer may import (docs/architecture.md); the root (lib.rs) may
# import all of them.
ALLOWED = {
    "sys": set(),
    "format": {"sys"},
    "error": {"format"},
    "engine": {"sys", "format", "error"},
    "queue": {"sys", "format", "error", "engine"},
    "admin": {"sys", "format", "error", "engine", "queue", "piper"},
    "piper": {"sys", "format", "error", "engine", "queue"},
    "spool": {"sys", "format", "error", "piper"},
    "aio": {"format", "error", "queue"},
    "serve": {"format", "error", "queue", "admin", "piper", "spool"},
    "bridge": {"sys", "format", "error", "queue", "piper"},
}
layer = lambda m: m.split("::")[0]
wrong = []
for a, bs in sorted(edges.items()):
    for b in sorted(bs):
        la, lb = layer(a), layer(b)
        if a and la != lb and lb not in ALLOWED.get(la, set()):
            wrong.append(f"{a} imports {b} ({la} may not import {lb})")
unknown = sorted({layer(m) for m in mods if m} - set(ALLOWED))
print(f"layers: {len(mods)} modules, {len(cycles)} import cycles, {len(wrong)} imports against the layering")
for c in cycles:
    print("  cycle:", " -> ".join(c))
for w in wrong:
    print("  ", w)
if unknown:
    print("  modules in no layer (add them to ALLOWED and docs/architecture.md):", ", ".join(unknown))
sys.exit(1 if cycles or wrong or unknown else 0)
