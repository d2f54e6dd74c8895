package xenstore

import "strings"

// node is one element of the store. Nodes are never modified once they
// are reachable from a root: an update copies the path from the root to
// the changed node (a persistent tree), so a transaction's snapshot costs
// one pointer and readers of an old root see a consistent tree.
type node struct {
	name  string
	value []byte
	perms []Perm
	kids  kidList
	// gen is the store generation at which this node's own value, perms or
	// list of children last changed. Copies made only because a
	// descendant changed keep it, so a transaction that read this node
	// conflicts only with real changes to it.
	gen uint64
}

func (n *node) clone() *node {
	c := *n
	return &c
}

func (n *node) child(name string) *node { return n.kids.get(name) }

// withChild returns a copy of n with child c (replacing one of the same
// name, or inserted).
func (n *node) withChild(c *node) *node {
	m := n.clone()
	m.kids = n.kids.with(c)
	return m
}

// withoutChild returns a copy of n without the child name.
func (n *node) withoutChild(name string) *node {
	l, ok := n.kids.without(name)
	if !ok {
		return n
	}
	m := n.clone()
	m.kids = l
	return m
}

// elems splits an absolute canonical path into its elements ("/" -> none).
func elems(p string) []string {
	if p == "/" || p == "" {
		return nil
	}
	return strings.Split(p[1:], "/")
}

// lookup returns the node at absolute path p, or nil.
func lookup(root *node, p string) *node {
	n := root
	for _, e := range elems(p) {
		if n = n.child(e); n == nil {
			return nil
		}
	}
	return n
}

// genOf is a node's generation, 0 when absent.
func genOf(root *node, p string) uint64 {
	if n := lookup(root, p); n != nil {
		return n.gen
	}
	return 0
}

// walk calls fn for n and every descendant, parents before children.
func walk(n *node, p string, fn func(p string, n *node)) {
	fn(p, n)
	for k := range n.kids.all() {
		kp := p + "/" + k.name
		if p == "/" {
			kp = "/" + k.name
		}
		walk(k, kp, fn)
	}
}

// countNodes counts n and its descendants.
func countNodes(n *node) int {
	c := 1
	for k := range n.kids.all() {
		c += countNodes(k)
	}
	return c
}

// newRoot is the tree a fresh xenstored starts with: the root and
// /tool/xenstored, owned by domain 0 and closed to others, as Xen's own.
func newRoot() *node {
	perms := []Perm{{Domid: 0, Access: PermNone}}
	xsd := &node{name: "xenstored", perms: perms, value: []byte{}}
	tool := &node{name: "tool", perms: perms, kids: makeKids(xsd), value: []byte{}}
	return &node{name: "", perms: perms, kids: makeKids(tool), value: []byte{}}
}
