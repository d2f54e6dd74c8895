package xenstore

import (
	"iter"
	"sort"
)

// maxChunk is the most children one chunk of a kidList holds. An update
// copies the chunk it changes and the list of chunks, so it costs about
// maxChunk + n/maxChunk pointers instead of n: a backend directory with a
// child per disk (1024 disks) is no longer copied whole on each write
// below it. Chunks split in halves when full and are never merged, so
// removals can leave more, smaller chunks; a write then still copies at
// most as many pointers as one flat list would.
const maxChunk = 64

// kidList is a node's children, sorted by name. Like nodes it is never
// modified once reachable: with and without return a new list that
// shares every chunk they did not change.
//
// Most nodes have a few children: up to maxChunk they are one flat slice,
// so a write below them costs one allocation, as a plain slice would.
type kidList struct {
	flat []*node // every child, sorted, while chunks is nil
	// chunks (two or more) hold the children once there are too many for
	// one: each non-empty and sorted, chunk i's names all before chunk i+1's.
	chunks [][]*node
	n      int
}

func makeKids(ks ...*node) kidList {
	var l kidList
	for _, k := range ks {
		l = l.with(k)
	}
	return l
}

func (l kidList) len() int { return l.n }

// count counts the children one by one, for Check.
func (l kidList) count() int {
	c := len(l.flat)
	for _, ch := range l.chunks {
		c += len(ch)
	}
	return c
}

// chunkFor is the chunk that holds name, or would: the first whose last
// name is not before it, else the last.
func (l kidList) chunkFor(name string) int {
	i := sort.Search(len(l.chunks), func(i int) bool {
		c := l.chunks[i]
		return c[len(c)-1].name >= name
	})
	if i == len(l.chunks) && i > 0 {
		i--
	}
	return i
}

// findIn returns the index of name in chunk c, or where it would go.
func findIn(c []*node, name string) (int, bool) {
	j := sort.Search(len(c), func(j int) bool { return c[j].name >= name })
	return j, j < len(c) && c[j].name == name
}

func (l kidList) get(name string) *node {
	c := l.flat
	if l.chunks != nil {
		c = l.chunks[l.chunkFor(name)]
	}
	if j, ok := findIn(c, name); ok {
		return c[j]
	}
	return nil
}

// with returns the list with k, replacing the child of the same name.
func (l kidList) with(k *node) kidList {
	if l.chunks == nil {
		j, ok := findIn(l.flat, k.name)
		if ok {
			c := append([]*node(nil), l.flat...)
			c[j] = k
			return kidList{flat: c, n: l.n}
		}
		c := make([]*node, 0, len(l.flat)+1)
		c = append(append(append(c, l.flat[:j]...), k), l.flat[j:]...)
		if len(c) <= maxChunk {
			return kidList{flat: c, n: len(c)}
		}
		h := len(c) / 2
		return kidList{chunks: [][]*node{c[:h:h], c[h:]}, n: len(c)}
	}
	i := l.chunkFor(k.name)
	old := l.chunks[i]
	j, ok := findIn(old, k.name)
	var repl [][]*node
	if ok {
		c := append([]*node(nil), old...)
		c[j] = k
		repl = [][]*node{c}
	} else {
		c := make([]*node, 0, len(old)+1)
		c = append(append(append(c, old[:j]...), k), old[j:]...)
		if len(c) > maxChunk {
			h := len(c) / 2
			repl = [][]*node{c[:h:h], c[h:]}
		} else {
			repl = [][]*node{c}
		}
	}
	n := l.n
	if !ok {
		n++
	}
	return kidList{chunks: splice(l.chunks, i, repl), n: n}
}

// without returns the list without the child name, and whether it was there.
func (l kidList) without(name string) (kidList, bool) {
	if l.chunks == nil {
		j, ok := findIn(l.flat, name)
		if !ok {
			return l, false
		}
		c := make([]*node, 0, len(l.flat)-1)
		return kidList{flat: append(append(c, l.flat[:j]...), l.flat[j+1:]...), n: l.n - 1}, true
	}
	i := l.chunkFor(name)
	old := l.chunks[i]
	j, ok := findIn(old, name)
	if !ok {
		return l, false
	}
	var repl [][]*node
	if len(old) > 1 {
		c := make([]*node, 0, len(old)-1)
		repl = [][]*node{append(append(c, old[:j]...), old[j+1:]...)}
	}
	chunks := splice(l.chunks, i, repl)
	if len(chunks) == 1 {
		return kidList{flat: chunks[0], n: l.n - 1}, true
	}
	return kidList{chunks: chunks, n: l.n - 1}, true
}

// splice returns a copy of chunks with chunk i replaced by repl.
func splice(chunks [][]*node, i int, repl [][]*node) [][]*node {
	out := make([][]*node, 0, len(chunks)-1+len(repl))
	out = append(out, chunks[:i]...)
	out = append(out, repl...)
	return append(out, chunks[i+1:]...)
}

// all yields the children in name order.
func (l kidList) all() iter.Seq[*node] {
	return func(yield func(*node) bool) {
		for _, k := range l.flat {
			if !yield(k) {
				return
			}
		}
		for _, c := range l.chunks {
			for _, k := range c {
				if !yield(k) {
					return
				}
			}
		}
	}
}
