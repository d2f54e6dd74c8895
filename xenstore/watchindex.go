package xenstore

import (
	"slices"
	"strings"
)

// A connection's watches are also kept by path, so that a change looks
// only at the watches on its path and the path's ancestors. fire used to
// compare every change with every watch: a daemon holding a watch per
// disk made each write cost as many comparisons as there were disks, and
// a fleet's convergence quadratic in them. seq keeps the order in which
// the watches were registered, which is the order their events go out.

func (cs *connState) addWatch(w *watchReg, seq uint64) {
	w.seq = seq
	cs.watches = append(cs.watches, w)
	if cs.byPath == nil {
		cs.byPath = map[string][]*watchReg{}
	}
	cs.byPath[w.path] = append(cs.byPath[w.path], w)
}

func (cs *connState) removeWatch(i int) {
	w := cs.watches[i]
	cs.watches = append(cs.watches[:i:i], cs.watches[i+1:]...)
	rest := slices.DeleteFunc(slices.Clone(cs.byPath[w.path]), func(x *watchReg) bool { return x == w })
	if len(rest) == 0 {
		delete(cs.byPath, w.path)
	} else {
		cs.byPath[w.path] = rest
	}
}

func (cs *connState) resetWatches() {
	cs.watches, cs.byPath = nil, nil
}

// watchesFor returns the connection's watches a change fires, in the
// order they were registered: those on the change's own path and, unless
// the change is exact, on every ancestor of it.
func (cs *connState) watchesFor(ch change) []*watchReg {
	var ws []*watchReg
	p := ch.path
	for {
		ws = append(ws, cs.byPath[p]...)
		if ch.exact || p == "/" || !strings.HasPrefix(p, "/") {
			break
		}
		p = parentOf(p)
	}
	slices.SortFunc(ws, func(a, b *watchReg) int {
		switch {
		case a.seq < b.seq:
			return -1
		case a.seq > b.seq:
			return 1
		}
		return 0
	})
	return ws
}
