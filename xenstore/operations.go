package xenstore

import "strconv"

// response is what an operation answers: the reply payload, an event for
// the requester to follow the reply (a new watch's first event), and the
// changes whose watches fire after both.
type response struct {
	payload []byte
	event   []byte
	changes []change
}

var okPayload = []byte("OK\x00")

// The State serves the operations listed in parseArgs and run; any other
// is answered ENOSYS. Both are plain switches rather than a table of
// functions so that the compiler can keep each request's view and
// arguments on the stack.

// privileged reports whether only dom0 may send op. Guests are refused
// before their arguments are read.
func privileged(op Op) bool {
	switch op {
	case OpIntroduce, OpRelease, OpResume, OpSetTarget, OpControl:
		return true
	}
	return false
}

// parseArgs parses the arguments of op, or answers ENOSYS.
func parseArgs(op Op, a args) (request, error) {
	switch op {
	case OpRead, OpMkdir, OpRm, OpDirectory:
		return parseNode(a)
	case OpWrite:
		return parseWrite(a)
	case OpDirectoryPart:
		return parseDirectoryPart(a)
	case OpGetPerms:
		return parseGetPerms(a)
	case OpSetPerms:
		return parseSetPerms(a)
	case OpWatch, OpUnwatch:
		return parseWatch(a)
	case OpTransactionStart, OpResetWatches:
		return request{}, nil
	case OpTransactionEnd:
		return parseTransactionEnd(a)
	case OpGetDomainPath:
		return parseGetDomainPath(a)
	case OpIsDomainIntroduced:
		return parseIsDomainIntroduced(a)
	case OpIntroduce:
		return parseIntroduce(a)
	case OpRelease:
		return parseRelease(a)
	case OpResume:
		return parseDomains(a, 1)
	case OpSetTarget:
		return parseDomains(a, 2)
	case OpControl:
		return parseControl(a)
	}
	return request{}, ErrNotSupp
}

// run performs a parsed request of a type parseArgs accepted.
func (s *State) run(op Op, cs *connState, v *view, r *request) (response, error) {
	switch op {
	case OpRead:
		return s.opRead(v, r)
	case OpWrite:
		return s.applied(v, v.write(r.path, r.value))
	case OpMkdir:
		return s.applied(v, v.mkdir(r.path))
	case OpRm:
		return s.applied(v, v.rm(r.path))
	case OpDirectory:
		return s.opDirectory(v, r)
	case OpDirectoryPart:
		return s.opDirectoryPart(v, r)
	case OpGetPerms:
		return s.opGetPerms(v, r)
	case OpSetPerms:
		return s.opSetPerms(cs, v, r)
	case OpWatch:
		return s.opWatch(cs, r)
	case OpUnwatch:
		return s.opUnwatch(cs, r)
	case OpTransactionStart:
		return s.opTransactionStart(cs)
	case OpTransactionEnd:
		return s.opTransactionEnd(cs, r)
	case OpGetDomainPath:
		return response{payload: joinStrings(DomainPath(r.domids[0]))}, nil
	case OpIsDomainIntroduced:
		return s.opIsDomainIntroduced(r)
	case OpIntroduce:
		return s.opIntroduce(r)
	case OpRelease:
		return s.opRelease(r)
	case OpResume, OpSetTarget:
		return s.opCheckDomains(r)
	case OpResetWatches:
		return s.opResetWatches(cs)
	case OpControl:
		return s.opControl(r)
	}
	return response{}, ErrNotSupp
}

// applied finishes a tree-changing operation. On the live tree a success
// becomes the new root and its watches fire; inside a transaction both
// wait for the commit.
func (s *State) applied(v *view, err error) (response, error) {
	if err != nil {
		return response{}, err
	}
	if v.base != nil {
		return response{payload: okPayload}, nil
	}
	s.root = v.root
	return response{payload: okPayload, changes: v.changes}, nil
}

func (s *State) opRead(v *view, r *request) (response, error) {
	n, err := v.read(r.path)
	if err != nil {
		return response{}, err
	}
	return response{payload: append([]byte(nil), n.value...)}, nil
}

func (s *State) opDirectory(v *view, r *request) (response, error) {
	n, err := v.read(r.path)
	if err != nil {
		return response{}, err
	}
	b := joinStrings(childNames(n)...)
	if len(b) > PayloadMax {
		return response{}, ErrTooBig
	}
	return response{payload: b}, nil
}

func (s *State) opDirectoryPart(v *view, r *request) (response, error) {
	n, err := v.read(r.path)
	if err != nil {
		return response{}, err
	}
	return response{payload: directoryPart(n, r.offset)}, nil
}

func childNames(n *node) []string {
	names := make([]string, 0, n.kids.len())
	for k := range n.kids.all() {
		names = append(names, k.name)
	}
	return names
}

// directoryPart answers DIRECTORY_PART: the node's generation, then as
// many whole names (from byte offset off of the full list) as fit; the
// last chunk ends with an extra NUL.
func directoryPart(n *node, off int) []byte {
	all := joinStrings(childNames(n)...)
	head := joinStrings(strconv.FormatUint(n.gen, 10))
	if off >= len(all) {
		return append(head, 0)
	}
	rest := all[off:]
	room := PayloadMax - len(head) - 1
	if len(rest) <= room {
		return append(append(head, rest...), 0)
	}
	// Cut after the last whole name that fits.
	cut := 0
	for i := 0; i < room; i++ {
		if rest[i] == 0 {
			cut = i + 1
		}
	}
	return append(head, rest[:cut]...)
}

func (s *State) opGetPerms(v *view, r *request) (response, error) {
	if r.special != "" {
		perms, ok := s.specialPerms[r.special]
		if !ok {
			return response{}, ErrNotFound
		}
		return response{payload: permsPayload(perms)}, nil
	}
	n, err := v.read(r.path)
	if err != nil {
		return response{}, err
	}
	return response{payload: permsPayload(n.perms)}, nil
}

// opSetPerms changes a node's permissions, or an @ pseudo-node's, which
// only dom0 may (they decide which guests see domain events). Pseudo-node
// permissions live outside the tree and transactions.
func (s *State) opSetPerms(cs *connState, v *view, r *request) (response, error) {
	if r.special == "" {
		return s.applied(v, v.setPerms(r.path, r.perms))
	}
	if !cs.priv {
		return response{}, ErrAccess
	}
	if _, ok := s.specialPerms[r.special]; !ok {
		return response{}, ErrNotFound
	}
	s.specialPerms[r.special] = r.perms
	return response{payload: okPayload}, nil
}

func (cs *connState) findWatch(path, token string) int {
	for i, w := range cs.watches {
		if w.path == path && w.token == token {
			return i
		}
	}
	return -1
}

// opWatch registers a watch. Its first event goes to the requester right
// after the OK, with the path as given, whether or not the node exists.
func (s *State) opWatch(cs *connState, r *request) (response, error) {
	if cs.findWatch(r.path, r.token) >= 0 {
		return response{}, ErrExists
	}
	if !cs.priv && len(cs.watches) >= s.Quota.Watches {
		return response{}, ErrNoSpace
	}
	s.watchN++
	cs.addWatch(&watchReg{path: r.path, orig: r.asSent, token: r.token}, s.watchN)
	return response{payload: okPayload, event: joinStrings(r.asSent, r.token)}, nil
}

func (s *State) opUnwatch(cs *connState, r *request) (response, error) {
	i := cs.findWatch(r.path, r.token)
	if i < 0 {
		return response{}, ErrNotFound
	}
	cs.removeWatch(i)
	return response{payload: okPayload}, nil
}

func (s *State) opTransactionStart(cs *connState) (response, error) {
	if !cs.priv && len(cs.txs) >= s.Quota.Transactions {
		return response{}, ErrNoSpace
	}
	s.nextTx++
	if s.nextTx == 0 {
		s.nextTx = 1
	}
	id := s.nextTx
	cs.txs[id] = &txState{view: &view{
		st: s, root: s.root, base: s.root, domid: cs.domid, priv: cs.priv, seen: map[string]uint64{},
	}}
	return response{payload: joinStrings(strconv.FormatUint(uint64(id), 10))}, nil
}

// opTransactionEnd ends the transaction named in the header; a failed
// commit ends it too.
func (s *State) opTransactionEnd(cs *connState, r *request) (response, error) {
	tx := cs.txs[r.tx]
	if tx == nil {
		return response{}, ErrNotFound
	}
	delete(cs.txs, r.tx)
	if !r.commit {
		return response{payload: okPayload}, nil
	}
	changes, err := s.commitTx(tx.view)
	return response{payload: okPayload, changes: changes}, err
}

func (s *State) opIsDomainIntroduced(r *request) (response, error) {
	if s.domains[r.domids[0]] {
		return response{payload: joinStrings("T")}, nil
	}
	return response{payload: joinStrings("F")}, nil
}

// opIntroduce records a domain. Introducing it again is success and
// fires nothing.
func (s *State) opIntroduce(r *request) (response, error) {
	id := r.domids[0]
	if s.domains[id] {
		return response{payload: okPayload}, nil
	}
	s.domains[id] = true
	return response{payload: okPayload, changes: []change{{path: WatchIntroduceDomain, exact: true}}}, nil
}

func (s *State) opRelease(r *request) (response, error) {
	id := r.domids[0]
	if !s.domains[id] {
		return response{}, ErrNotFound
	}
	delete(s.domains, id)
	return response{payload: okPayload, changes: []change{{path: WatchReleaseDomain, exact: true}}}, nil
}

// opCheckDomains serves RESUME and SET_TARGET: with no ring to resume and
// no target privileges to grant, all that is left is checking that the
// domains named were introduced.
func (s *State) opCheckDomains(r *request) (response, error) {
	for _, id := range r.domids {
		if !s.domains[id] {
			return response{}, ErrNotFound
		}
	}
	if r.badDomid {
		return response{}, ErrInvalid
	}
	return response{payload: okPayload}, nil
}

// opResetWatches forgets the connection's watches and open transactions,
// as a guest's xenbus driver asks after a kexec.
func (s *State) opResetWatches(cs *connState) (response, error) {
	cs.resetWatches()
	cs.txs = map[uint32]*txState{}
	return response{payload: okPayload}, nil
}

func (s *State) opControl(r *request) (response, error) {
	switch r.control {
	case "print":
		s.logf("control print: %s", r.text)
	case "check":
		if err := s.Check(); err != nil {
			s.logf("control check: %v", err)
			return response{}, ErrIO
		}
	case "help":
		return response{payload: joinStrings("check\nprint <string>\nhelp\n")}, nil
	}
	return response{payload: okPayload}, nil
}
