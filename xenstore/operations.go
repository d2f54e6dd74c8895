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

// operation is how the State serves one message type: parse the
// arguments, then run with them. Privileged operations are refused to
// guests before their arguments are read.
type operation struct {
	privileged bool
	parse      func(args) (request, error)
	run        func(s *State, cs *connState, v *view, r *request) (response, error)
}

// operations lists every message type the State serves; any other is
// answered ENOSYS.
var operations = map[Op]operation{
	OpRead:               {parse: parseNode, run: (*State).opRead},
	OpWrite:              {parse: parseWrite, run: (*State).opWrite},
	OpMkdir:              {parse: parseNode, run: (*State).opMkdir},
	OpRm:                 {parse: parseNode, run: (*State).opRm},
	OpDirectory:          {parse: parseNode, run: (*State).opDirectory},
	OpDirectoryPart:      {parse: parseDirectoryPart, run: (*State).opDirectoryPart},
	OpGetPerms:           {parse: parseGetPerms, run: (*State).opGetPerms},
	OpSetPerms:           {parse: parseSetPerms, run: (*State).opSetPerms},
	OpWatch:              {parse: parseWatch, run: (*State).opWatch},
	OpUnwatch:            {parse: parseWatch, run: (*State).opUnwatch},
	OpTransactionStart:   {parse: parseNothing, run: (*State).opTransactionStart},
	OpTransactionEnd:     {parse: parseTransactionEnd, run: (*State).opTransactionEnd},
	OpGetDomainPath:      {parse: parseGetDomainPath, run: (*State).opGetDomainPath},
	OpIsDomainIntroduced: {parse: parseIsDomainIntroduced, run: (*State).opIsDomainIntroduced},
	OpIntroduce:          {privileged: true, parse: parseIntroduce, run: (*State).opIntroduce},
	OpRelease:            {privileged: true, parse: parseRelease, run: (*State).opRelease},
	OpResume:             {privileged: true, parse: parseDomains(1), run: (*State).opCheckDomains},
	OpSetTarget:          {privileged: true, parse: parseDomains(2), run: (*State).opCheckDomains},
	OpResetWatches:       {parse: parseNothing, run: (*State).opResetWatches},
	OpControl:            {privileged: true, parse: parseControl, run: (*State).opControl},
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

func (s *State) opRead(_ *connState, v *view, r *request) (response, error) {
	n, err := v.read(r.path)
	if err != nil {
		return response{}, err
	}
	return response{payload: append([]byte(nil), n.value...)}, nil
}

func (s *State) opWrite(_ *connState, v *view, r *request) (response, error) {
	return s.applied(v, v.write(r.path, r.value))
}

func (s *State) opMkdir(_ *connState, v *view, r *request) (response, error) {
	return s.applied(v, v.mkdir(r.path))
}

func (s *State) opRm(_ *connState, v *view, r *request) (response, error) {
	return s.applied(v, v.rm(r.path))
}

func (s *State) opDirectory(_ *connState, v *view, r *request) (response, error) {
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

func (s *State) opDirectoryPart(_ *connState, v *view, r *request) (response, error) {
	n, err := v.read(r.path)
	if err != nil {
		return response{}, err
	}
	return response{payload: directoryPart(n, r.offset)}, nil
}

func childNames(n *node) []string {
	names := make([]string, len(n.kids))
	for i, k := range n.kids {
		names[i] = k.name
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

func (s *State) opGetPerms(_ *connState, v *view, r *request) (response, error) {
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
func (s *State) opWatch(cs *connState, _ *view, r *request) (response, error) {
	if cs.findWatch(r.path, r.token) >= 0 {
		return response{}, ErrExists
	}
	if !cs.priv && len(cs.watches) >= s.Quota.Watches {
		return response{}, ErrNoSpace
	}
	cs.watches = append(cs.watches, &watchReg{path: r.path, orig: r.asSent, token: r.token})
	return response{payload: okPayload, event: joinStrings(r.asSent, r.token)}, nil
}

func (s *State) opUnwatch(cs *connState, _ *view, r *request) (response, error) {
	i := cs.findWatch(r.path, r.token)
	if i < 0 {
		return response{}, ErrNotFound
	}
	cs.watches = append(cs.watches[:i:i], cs.watches[i+1:]...)
	return response{payload: okPayload}, nil
}

func (s *State) opTransactionStart(cs *connState, _ *view, _ *request) (response, error) {
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
func (s *State) opTransactionEnd(cs *connState, _ *view, r *request) (response, error) {
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

func (s *State) opGetDomainPath(_ *connState, _ *view, r *request) (response, error) {
	return response{payload: joinStrings(DomainPath(r.domids[0]))}, nil
}

func (s *State) opIsDomainIntroduced(_ *connState, _ *view, r *request) (response, error) {
	if s.domains[r.domids[0]] {
		return response{payload: joinStrings("T")}, nil
	}
	return response{payload: joinStrings("F")}, nil
}

// opIntroduce records a domain. Introducing it again is success and
// fires nothing.
func (s *State) opIntroduce(_ *connState, _ *view, r *request) (response, error) {
	id := r.domids[0]
	if s.domains[id] {
		return response{payload: okPayload}, nil
	}
	s.domains[id] = true
	return response{payload: okPayload, changes: []change{{path: WatchIntroduceDomain, exact: true}}}, nil
}

func (s *State) opRelease(_ *connState, _ *view, r *request) (response, error) {
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
func (s *State) opCheckDomains(_ *connState, _ *view, r *request) (response, error) {
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
func (s *State) opResetWatches(cs *connState, _ *view, _ *request) (response, error) {
	cs.watches = nil
	cs.txs = map[uint32]*txState{}
	return response{payload: okPayload}, nil
}

func (s *State) opControl(_ *connState, _ *view, r *request) (response, error) {
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
