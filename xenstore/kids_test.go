package xenstore

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"sort"
	"testing"
)

// TestKidListModel checks kidList against a map under random inserts,
// replacements and deletions, across chunk splits and emptied chunks, and
// that every earlier version still reads as it did (the store's
// transactions keep old roots).
func TestKidListModel(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	type version struct {
		l     kidList
		model map[string]*node
	}
	var versions []version
	l := kidList{}
	model := map[string]*node{}
	for step := range 20000 {
		name := fmt.Sprintf("k%d", r.IntN(600))
		if r.IntN(3) == 0 {
			var ok bool
			l, ok = l.without(name)
			if _, want := model[name]; ok != want {
				t.Fatalf("step %d: without(%s) = %v, want %v", step, name, ok, want)
			}
			delete(model, name)
		} else {
			k := &node{name: name, gen: uint64(step)}
			l = l.with(k)
			model[name] = k
		}
		if step%500 == 0 {
			versions = append(versions, version{l, maps(model)})
		}
		if step%97 == 0 {
			checkKids(t, l, model)
		}
	}
	checkKids(t, l, model)
	// Then empty it, back through one chunk to none.
	var names []string
	for name := range model {
		names = append(names, name)
	}
	r.Shuffle(len(names), func(i, j int) { names[i], names[j] = names[j], names[i] })
	sawChunks := l.chunks != nil
	for _, name := range names {
		var ok bool
		if l, ok = l.without(name); !ok {
			t.Fatalf("without(%s) found nothing", name)
		}
		delete(model, name)
		checkKids(t, l, model)
	}
	if !sawChunks || l.len() != 0 {
		t.Fatalf("chunked %v, %d left", sawChunks, l.len())
	}
	for _, v := range versions {
		checkKids(t, v.l, v.model)
	}
}

func maps(m map[string]*node) map[string]*node {
	c := make(map[string]*node, len(m))
	for k, v := range m {
		c[k] = v
	}
	return c
}

func checkKids(t *testing.T, l kidList, model map[string]*node) {
	t.Helper()
	if l.len() != len(model) || l.count() != len(model) {
		t.Fatalf("len %d count %d, want %d", l.len(), l.count(), len(model))
	}
	var names []string
	for k := range l.all() {
		names = append(names, k.name)
		if model[k.name] != k {
			t.Fatalf("%s: not the node last written", k.name)
		}
	}
	if !sort.StringsAreSorted(names) || len(slices.Compact(slices.Clone(names))) != len(names) {
		t.Fatalf("names out of order or repeated: %v", names)
	}
	for name, k := range model {
		if l.get(name) != k {
			t.Fatalf("get(%s) = %v, want %v", name, l.get(name), k)
		}
	}
	if len(l.flat) > maxChunk || l.chunks != nil && (len(l.flat) != 0 || len(l.chunks) < 2) {
		t.Fatalf("%d flat children beside %d chunks", len(l.flat), len(l.chunks))
	}
	for _, c := range l.chunks {
		if len(c) == 0 || len(c) > maxChunk {
			t.Fatalf("chunk of %d children", len(c))
		}
	}
	if l.get("absent") != nil {
		t.Fatal("get found an absent child")
	}
}

// BenchmarkWriteWide writes one key under each of n siblings, as the
// daemon does below a backend directory with a child per disk: a write
// should cost about the same for 64 and 4096 siblings.
//
//	go test -run '^$' -bench WriteWide ./xenstore
func BenchmarkWriteWide(b *testing.B) {
	for _, n := range []int{64, 1024, 4096} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			st := NewState()
			st.AddConn(1, 0)
			key := func(i int) []byte {
				return joinStrings(fmt.Sprintf("/local/domain/0/backend/vbd3/0/%d/state", i))
			}
			for i := range n {
				if out := st.Handle(1, Message{Type: OpWrite, Payload: append(key(i), '1')}); out[0].Msg.Type != OpWrite {
					b.Fatal(out[0].Msg)
				}
			}
			for i := 0; b.Loop(); i++ {
				if out := st.Handle(1, Message{Type: OpWrite, Payload: append(key(i%n), '4')}); out[0].Msg.Type != OpWrite {
					b.Fatal(out[0].Msg)
				}
			}
		})
	}
}
