package xenstore

import (
	"bytes"
	"errors"
	"reflect"
	"testing"
)

// FuzzParseRequest feeds arbitrary payloads to every operation's parser,
// as domain 0 and as a guest. A parser may only fail with EINVAL; what it
// accepts must be usable without further checks: paths canonical (parsing
// them again changes nothing), a WRITE's value exactly the bytes after the
// path, one permission per argument, domids present where the operation
// uses them. Parsing twice gives the same request.
func FuzzParseRequest(f *testing.F) {
	f.Add(uint8(OpRead), false, []byte("/local/domain/0/backend\x00"))
	f.Add(uint8(OpWrite), true, []byte("device/vbd/768/state\x004"))
	f.Add(uint8(OpSetPerms), true, []byte("data\x00b5\x00r0\x00"))
	f.Add(uint8(OpWatch), false, []byte("@releaseDomain\x00tok\x00"))
	f.Add(uint8(OpSetTarget), false, []byte("99\x00x\x00"))
	f.Fuzz(func(t *testing.T, op uint8, guest bool, payload []byte) {
		domid := uint32(0)
		if guest {
			domid = 5
		}
		r, err := parseArgs(Op(op), newArgs(domid, payload))
		if errors.Is(err, ErrNotSupp) {
			return
		}
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("%s %q: error %v is not EINVAL", Op(op), payload, err)
			}
			return
		}
		again, _ := parseArgs(Op(op), newArgs(domid, payload))
		if !reflect.DeepEqual(r, again) {
			t.Fatalf("%s %q: parsed %+v then %+v", Op(op), payload, r, again)
		}
		checkParsed(t, Op(op), domid, payload, &r)
	})
}

func checkParsed(t *testing.T, op Op, domid uint32, payload []byte, r *request) {
	t.Helper()
	watch := op == OpWatch || op == OpUnwatch
	if r.path != "" {
		if p, err := CanonicalPath(domid, r.path, watch); err != nil || p != r.path || p[0] == '@' && !watch {
			t.Fatalf("%s %q: path %q is not canonical (%q, %v)", op, payload, r.path, p, err)
		}
	}
	args, _ := splitStrings(payload)
	switch op {
	case OpRead, OpMkdir, OpRm, OpDirectory, OpDirectoryPart, OpWrite:
		if r.path == "" {
			t.Fatalf("%s %q: accepted without a path", op, payload)
		}
	case OpGetPerms, OpSetPerms:
		if (r.path == "") == (r.special == "") {
			t.Fatalf("%s %q: path %q, special %q", op, payload, r.path, r.special)
		}
	case OpGetDomainPath, OpIsDomainIntroduced, OpIntroduce, OpRelease:
		if len(r.domids) != 1 {
			t.Fatalf("%s %q: domids %v", op, payload, r.domids)
		}
	case OpResume, OpSetTarget:
		if len(r.domids) > len(args) || r.badDomid == (len(r.domids) == len(args)) {
			t.Fatalf("%s %q: domids %v, bad %v", op, payload, r.domids, r.badDomid)
		}
	}
	if op == OpWrite && !bytes.Equal(r.value, payload[bytes.IndexByte(payload, 0)+1:]) {
		t.Fatalf("WRITE %q: value %q", payload, r.value)
	}
	if op == OpSetPerms && len(r.perms) != len(args)-1 {
		t.Fatalf("SET_PERMS %q: %d permissions from %d arguments", payload, len(r.perms), len(args)-1)
	}
}

// TestErrorPrecedence pins which error a request that is wrong in several
// ways gets: the transaction is resolved first, then the operation looked
// up, then privilege checked, then the arguments parsed, and only then the
// tree or the domain table consulted.
func TestErrorPrecedence(t *testing.T) {
	e := func(conn ConnID, name string) string { return w(conn, OpError, z(name)) }
	runSteps(t, []step{
		// An unknown transaction beats an unknown operation.
		{3, Op(99), 7, "", []string{e(3, "ENOENT")}},
		{3, Op(99), 0, "", []string{e(3, "ENOSYS")}},
		{1, OpTransactionStart, 7, "", []string{e(1, "EBUSY")}},
		// A guest's privileged request is refused before its arguments are read.
		{3, OpIntroduce, 0, "x", []string{e(3, "EACCES")}},
		{3, OpControl, 0, "", []string{e(3, "EACCES")}},
		{1, OpIntroduce, 0, z("0", "1", "2"), []string{e(1, "EINVAL")}},
		// SET_PERMS on a pseudo-node: bad permissions, then privilege.
		{3, OpSetPerms, 0, z("@releaseDomain", "x5"), []string{e(3, "EINVAL")}},
		{3, OpSetPerms, 0, z("@releaseDomain", "r5"), []string{e(3, "EACCES")}},
		{1, OpSetPerms, 0, z("@nosuch", "r5"), []string{e(1, "ENOENT")}},
		// Bad arguments beat a missing node.
		{1, OpDirectoryPart, 0, z("/nosuch", "x"), []string{e(1, "EINVAL")}},
		{1, OpRead, 0, z("/nosuch"), []string{e(1, "ENOENT")}},
		// RESUME and SET_TARGET check each domain in turn.
		{1, OpSetTarget, 0, z("99", "x"), []string{e(1, "ENOENT")}},
		{1, OpSetTarget, 0, z("0", "x"), []string{e(1, "EINVAL")}},
		{1, OpSetTarget, 0, z("0", "0"), []string{w(1, OpSetTarget, ok)}},
		// TRANSACTION_END checks its argument before the transaction.
		{1, OpTransactionEnd, 0, z("X"), []string{e(1, "EINVAL")}},
		{1, OpTransactionEnd, 0, z("T"), []string{e(1, "ENOENT")}},
	})
}
