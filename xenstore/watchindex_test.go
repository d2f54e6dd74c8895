package xenstore

import (
	"math/rand/v2"
	"slices"
	"testing"
)

// TestWatchesForMatchesScan: the index picks the watches, in the order,
// that comparing the change with every watch (what fire did before it)
// picks, through registrations, removals and a reset.
func TestWatchesForMatchesScan(t *testing.T) {
	paths := []string{"/", "/a", "/a/b", "/a/b/c", "/a/bc", "/ab", "/x/y", "@introduceDomain", "@releaseDomain"}
	rng := rand.New(rand.NewPCG(1, 2))
	cs := &connState{}
	var seq uint64
	scan := func(ch change) []*watchReg {
		var ws []*watchReg
		for _, w := range cs.watches {
			if ch.exact && ch.path == w.path || !ch.exact && isUnder(ch.path, w.path) {
				ws = append(ws, w)
			}
		}
		return ws
	}
	for step := range 2000 {
		switch r := rng.IntN(10); {
		case r < 5:
			seq++
			cs.addWatch(&watchReg{path: paths[rng.IntN(len(paths))], token: string(rune('a' + rng.IntN(3)))}, seq)
		case r < 8 && len(cs.watches) > 0:
			cs.removeWatch(rng.IntN(len(cs.watches)))
		case r == 9 && rng.IntN(20) == 0:
			cs.resetWatches()
		}
		ch := change{path: paths[rng.IntN(len(paths))], exact: rng.IntN(3) == 0}
		if got, want := cs.watchesFor(ch), scan(ch); !slices.Equal(got, want) {
			t.Fatalf("step %d, change %+v: index gives %d watches, the scan %d", step, ch, len(got), len(want))
		}
	}
}
