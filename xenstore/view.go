package xenstore

// change is one modification that may fire watches. A watch on W fires
// for a non-exact change of p when p is W or lies beneath W; for an exact
// change only when p is W (used for each node a recursive RM deletes).
type change struct {
	path  string
	exact bool
	perms []Perm // of the changed node, for domains' read checks
}

// opRecord is a mutating request inside a transaction, replayed on the
// live tree at commit.
type opRecord struct {
	op    Op
	path  string
	value []byte
	perms []Perm
}

// view applies requests to one root on behalf of one domain. Outside a
// transaction it works on the live tree; inside, on the transaction's
// snapshot, recording every path it touches so the commit can detect
// conflicts.
type view struct {
	st    *State
	root  *node
	domid uint32
	priv  bool
	// Transaction bookkeeping; base is nil outside a transaction.
	base    *node
	seen    map[string]uint64
	log     []opRecord
	changes []change
}

func (v *view) note(p string) {
	if v.base == nil {
		return
	}
	if _, ok := v.seen[p]; !ok {
		v.seen[p] = genOf(v.base, p)
	}
}

func (v *view) canRead(n *node) bool  { return v.priv || accessFor(n.perms, v.domid).canRead() }
func (v *view) canWrite(n *node) bool { return v.priv || accessFor(n.perms, v.domid).canWrite() }

// nearest returns the node at p or its nearest existing ancestor.
func nearest(root *node, p string) *node {
	n := root
	for _, e := range elems(p) {
		c := n.child(e)
		if c == nil {
			return n
		}
		n = c
	}
	return n
}

func (v *view) read(p string) (*node, error) {
	v.note(p)
	n := lookup(v.root, p)
	if n == nil {
		return nil, ErrNotFound
	}
	if !v.canRead(n) {
		return nil, ErrAccess
	}
	return n, nil
}

// inherit gives a new child its parent's permissions; a domain owns what
// it creates.
func (v *view) inherit(parent []Perm) []Perm {
	p := append([]Perm(nil), parent...)
	if !v.priv && len(p) > 0 {
		p[0].Domid = v.domid
	}
	return p
}

// put creates p (and missing parents, with empty values) or updates it,
// applying fn to the node. It records access and a non-exact change of p.
func (v *view) put(p string, fn func(n *node)) error {
	// Permission: write on the node if it exists, else on the nearest
	// ancestor (creating is writing to the parent).
	if t := nearest(v.root, p); !v.canWrite(t) {
		v.note(p)
		return ErrAccess
	}
	if err := v.st.checkNodeQuota(v, p); err != nil {
		return err
	}
	var rec func(n *node, es []string, cur string) *node
	rec = func(n *node, es []string, cur string) *node {
		if len(es) == 0 {
			v.note(cur)
			m := n.clone()
			fn(m)
			m.gen = v.st.nextGen()
			return m
		}
		kp := cur + "/" + es[0]
		if cur == "/" {
			kp = "/" + es[0]
		}
		c := n.child(es[0])
		created := c == nil
		if created {
			v.note(kp)
			c = &node{name: es[0], perms: v.inherit(n.perms), value: []byte{}}
		}
		nc := rec(c, es[1:], kp)
		m := n.withChild(nc)
		if created {
			v.note(cur)
			m.gen = v.st.nextGen()
		}
		return m
	}
	v.root = rec(v.root, elems(p), "/")
	n := lookup(v.root, p)
	v.changes = append(v.changes, change{path: p, perms: n.perms})
	return nil
}

func (v *view) write(p string, value []byte) error {
	if err := v.st.checkValueQuota(v, value); err != nil {
		return err
	}
	if err := v.put(p, func(n *node) { n.value = append([]byte(nil), value...) }); err != nil {
		return err
	}
	v.log = append(v.log, opRecord{op: OpWrite, path: p, value: value})
	return nil
}

func (v *view) mkdir(p string) error {
	v.note(p)
	if n := lookup(v.root, p); n != nil {
		// Existing node: success, nothing changes, no watch fires.
		if !v.canWrite(n) {
			return ErrAccess
		}
		return nil
	}
	if err := v.put(p, func(*node) {}); err != nil {
		return err
	}
	v.log = append(v.log, opRecord{op: OpMkdir, path: p})
	return nil
}

func (v *view) setPerms(p string, perms []Perm) error {
	v.note(p)
	n := lookup(v.root, p)
	if n == nil {
		return ErrNotFound
	}
	if !v.priv && !(len(n.perms) > 0 && n.perms[0].Domid == v.domid) {
		// Only the owner (or dom0) may change permissions.
		return ErrAccess
	}
	if !v.priv && perms[0].Domid != n.perms[0].Domid {
		// Giving a node away would give away quota: only dom0 may.
		return ErrPermission
	}
	if !v.priv && len(perms) > v.st.Quota.PermsPerNode {
		return ErrNoSpace
	}
	np := append([]Perm(nil), perms...)
	if err := v.put(p, func(n *node) { n.perms = np }); err != nil {
		return err
	}
	v.log = append(v.log, opRecord{op: OpSetPerms, path: p, perms: np})
	return nil
}

// rm deletes p and everything beneath it. A missing node whose parent
// exists is success (as C xenstored answers); a missing parent is ENOENT.
func (v *view) rm(p string) error {
	v.note(p)
	if p == "/" {
		return ErrInvalid
	}
	n := lookup(v.root, p)
	parent := parentOf(p)
	if n == nil {
		v.note(parent)
		if lookup(v.root, parent) == nil {
			return ErrNotFound
		}
		return nil
	}
	if !v.canWrite(n) {
		return ErrAccess
	}
	v.note(parent)
	var deleted []change
	walk(n, p, func(q string, d *node) {
		deleted = append(deleted, change{path: q, exact: true, perms: d.perms})
	})
	gen := v.st.nextGen()
	var rec func(m *node, es []string) *node
	rec = func(m *node, es []string) *node {
		if len(es) == 1 {
			r := m.withoutChild(es[0])
			r.gen = gen
			return r
		}
		return m.withChild(rec(m.child(es[0]), es[1:]))
	}
	v.root = rec(v.root, elems(p))
	v.changes = append(v.changes, change{path: p, perms: n.perms})
	v.changes = append(v.changes, deleted...)
	v.log = append(v.log, opRecord{op: OpRm, path: p})
	return nil
}

// commitTx applies a transaction if nothing it touched changed since it
// started, else EAGAIN.
func (s *State) commitTx(v *view) ([]change, error) {
	for p, g := range v.seen {
		if genOf(s.root, p) != g {
			return nil, ErrAgain
		}
	}
	live := &view{st: s, root: s.root, domid: v.domid, priv: v.priv}
	for _, r := range v.log {
		var err error
		switch r.op {
		case OpWrite:
			err = live.write(r.path, r.value)
		case OpMkdir:
			err = live.mkdir(r.path)
		case OpRm:
			err = live.rm(r.path)
		case OpSetPerms:
			err = live.setPerms(r.path, r.perms)
		}
		if err != nil {
			// Nothing the transaction touched changed, but a limit that
			// depends on the whole tree (a domain's node quota) may now
			// be exceeded: fail the commit as a whole, touching nothing.
			s.logf("transaction replay of %s %s: %v", r.op, r.path, err)
			return nil, err
		}
	}
	s.root = live.root
	return live.changes, nil
}

// fire turns changes into WATCH_EVENTs for every connection's watches,
