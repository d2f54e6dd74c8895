package xenstore

import (
	"fmt"
	"strings"
	"testing"
)

// z joins parts, each followed by a NUL: the usual request encoding.
func z(parts ...string) string { return string(joinStrings(parts...)) }

// step is one request and every message the State must send in answer,
// in order. Outgoing messages are written "conn:TYPE:payload".
type step struct {
	conn ConnID
	op   Op
	tx   uint32
	in   string
	want []string
}

func fmtOut(o Outgoing) string {
	return fmt.Sprintf("%d:%s:%q", o.Conn, o.Msg.Type, o.Msg.Payload)
}

func w(conn ConnID, op Op, payload string) string {
	return fmt.Sprintf("%d:%s:%q", conn, op, payload)
}

// runSteps plays steps on a State with connections 1 (dom0), 2 (dom0)
// and 3 (domain 5). ReqIDs are numbered from 1 and must be echoed.
func runSteps(t *testing.T, steps []step) *State {
	t.Helper()
	st := NewState()
	st.AddConn(1, 0)
	st.AddConn(2, 0)
	st.AddConn(3, 5)
	for i, s := range steps {
		req := Message{Type: s.op, ReqID: uint32(100 + i), TxID: s.tx, Payload: []byte(s.in)}
		outs := st.Handle(s.conn, req)
		var got []string
		for j, o := range outs {
			got = append(got, fmtOut(o))
			if j == 0 && (o.Msg.ReqID != req.ReqID || o.Msg.TxID != req.TxID) {
				t.Errorf("step %d: reply ids %d/%d, want %d/%d", i, o.Msg.ReqID, o.Msg.TxID, req.ReqID, req.TxID)
			}
		}
		if strings.Join(got, "\n") != strings.Join(s.want, "\n") {
			t.Fatalf("step %d (%d %s %q):\n got: %s\nwant: %s", i, s.conn, s.op, s.in,
				strings.Join(got, "\n      "), strings.Join(s.want, "\n      "))
		}
		if err := st.Check(); err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
	}
	return st
}

const ok = "OK\x00"

func TestStateBasics(t *testing.T) {
	runSteps(t, []step{
		{1, OpRead, 0, z("/a"), []string{w(1, OpError, z("ENOENT"))}},
		{1, OpWrite, 0, "/a/b/c\x00v1", []string{w(1, OpWrite, ok)}},
		{1, OpRead, 0, z("/a/b/c"), []string{w(1, OpRead, "v1")}},
		// Parents are created with empty values.
		{1, OpRead, 0, z("/a/b"), []string{w(1, OpRead, "")}},
		{1, OpDirectory, 0, z("/a"), []string{w(1, OpDirectory, z("b"))}},
		{1, OpDirectory, 0, z("/a/b/c"), []string{w(1, OpDirectory, "")}},
		{1, OpDirectory, 0, z("/nope"), []string{w(1, OpError, z("ENOENT"))}},
		{1, OpWrite, 0, "/a/b/d\x00", []string{w(1, OpWrite, ok)}},
		{1, OpDirectory, 0, z("/a/b"), []string{w(1, OpDirectory, z("c", "d"))}},
		{1, OpMkdir, 0, z("/a/b/c"), []string{w(1, OpMkdir, ok)}},
		{1, OpRead, 0, z("/a/b/c"), []string{w(1, OpRead, "v1")}},
		{1, OpMkdir, 0, z("/m/n"), []string{w(1, OpMkdir, ok)}},
		{1, OpGetPerms, 0, z("/m/n"), []string{w(1, OpGetPerms, z("n0"))}},
		// RM: missing node with existing parent is OK (as C xenstored);
		// missing parent is ENOENT; root is EINVAL.
		{1, OpRm, 0, z("/a/zz"), []string{w(1, OpRm, ok)}},
		{1, OpRm, 0, z("/zz/yy"), []string{w(1, OpError, z("ENOENT"))}},
		{1, OpRm, 0, z("/"), []string{w(1, OpError, z("EINVAL"))}},
		{1, OpRm, 0, z("/a/b"), []string{w(1, OpRm, ok)}},
		{1, OpRead, 0, z("/a/b/c"), []string{w(1, OpError, z("ENOENT"))}},
		{1, OpDirectory, 0, z("/"), []string{w(1, OpDirectory, z("a", "m", "tool"))}},
		// Relative paths live under /local/domain/<domid>.
		{1, OpWrite, 0, "rel\x00x", []string{w(1, OpWrite, ok)}},
		{1, OpRead, 0, z("/local/domain/0/rel"), []string{w(1, OpRead, "x")}},
		// Malformed requests.
		{1, OpRead, 0, "/a", []string{w(1, OpError, z("EINVAL"))}},
		{1, OpRead, 0, z("/a", "b"), []string{w(1, OpError, z("EINVAL"))}},
		{1, OpWrite, 0, "/a", []string{w(1, OpError, z("EINVAL"))}},
		{1, OpWrite, 0, "/a/\x00v", []string{w(1, OpError, z("EINVAL"))}},
		{1, OpRead, 0, z("/a//b"), []string{w(1, OpError, z("EINVAL"))}},
		{1, OpRead, 0, z("@releaseDomain"), []string{w(1, OpError, z("EINVAL"))}},
		{1, OpWatchEvent, 0, z("/a", "t"), []string{w(1, OpError, z("ENOSYS"))}},
		{1, Op(99), 0, "", []string{w(1, OpError, z("ENOSYS"))}},
		{1, OpGetDomainPath, 0, z("7"), []string{w(1, OpGetDomainPath, z("/local/domain/7"))}},
		{1, OpGetDomainPath, 0, z("x"), []string{w(1, OpGetDomainPath, z("/local/domain/0"))}},
		{1, OpIsDomainIntroduced, 0, z("0"), []string{w(1, OpIsDomainIntroduced, z("T"))}},
		{1, OpIsDomainIntroduced, 0, z("9"), []string{w(1, OpIsDomainIntroduced, z("F"))}},
	})
}

func TestStatePerms(t *testing.T) {
	runSteps(t, []step{
		{1, OpWrite, 0, "/p\x00secret", []string{w(1, OpWrite, ok)}},
		{3, OpRead, 0, z("/p"), []string{w(3, OpError, z("EACCES"))}},
		{1, OpSetPerms, 0, z("/p", "n0", "r5"), []string{w(1, OpSetPerms, ok)}},
		{1, OpGetPerms, 0, z("/p"), []string{w(1, OpGetPerms, z("n0", "r5"))}},
		{3, OpRead, 0, z("/p"), []string{w(3, OpRead, "secret")}},
		{3, OpWrite, 0, "/p\x00x", []string{w(3, OpError, z("EACCES"))}},
		{3, OpSetPerms, 0, z("/p", "b5"), []string{w(3, OpError, z("EACCES"))}},
		// Children inherit the parent's perms.
		{1, OpWrite, 0, "/p/c\x00y", []string{w(1, OpWrite, ok)}},
		{1, OpGetPerms, 0, z("/p/c"), []string{w(1, OpGetPerms, z("n0", "r5"))}},
		// A domain owns what it creates in its home.
		{1, OpMkdir, 0, z("/local/domain/5"), []string{w(1, OpMkdir, ok)}},
		{1, OpSetPerms, 0, z("/local/domain/5", "n5"), []string{w(1, OpSetPerms, ok)}},
		{3, OpWrite, 0, "data/x\x001", []string{w(3, OpWrite, ok)}},
		{3, OpGetPerms, 0, z("data/x"), []string{w(3, OpGetPerms, z("n5"))}},
		{3, OpSetPerms, 0, z("data/x", "r5", "b7"), []string{w(3, OpSetPerms, ok)}},
		// Only dom0 may change a node's owner.
		{3, OpSetPerms, 0, z("data/x", "b7"), []string{w(3, OpError, z("EPERM"))}},
		{3, OpSetPerms, 0, z("data/x", "r5", "b7", "b8", "b9", "b10", "b11"), []string{w(3, OpError, z("ENOSPC"))}},
		{3, OpSetPerms, 0, z("data/x", "w"), []string{w(3, OpError, z("EINVAL"))}},
		{1, OpSetPerms, 0, z("/p"), []string{w(1, OpError, z("EINVAL"))}},
		{1, OpSetPerms, 0, z("/nope", "n0"), []string{w(1, OpError, z("ENOENT"))}},
		{3, OpIntroduce, 0, z("6", "1", "2"), []string{w(3, OpError, z("EACCES"))}},
	})
}

func TestStateWatches(t *testing.T) {
	runSteps(t, []step{
		// Fires once on registration, after the OK, with the path as given.
		{2, OpWatch, 0, z("/w", "tok"), []string{w(2, OpWatch, ok), w(2, OpWatchEvent, z("/w", "tok"))}},
		{2, OpWatch, 0, z("/w", "tok"), []string{w(2, OpError, z("EEXIST"))}},
		{1, OpWrite, 0, "/w\x00v", []string{w(1, OpWrite, ok), w(2, OpWatchEvent, z("/w", "tok"))}},
		{1, OpWrite, 0, "/w/x/y\x00v", []string{w(1, OpWrite, ok), w(2, OpWatchEvent, z("/w/x/y", "tok"))}},
		{1, OpWrite, 0, "/other\x00v", []string{w(1, OpWrite, ok)}},
		{1, OpWrite, 0, "/wx\x00v", []string{w(1, OpWrite, ok)}},
		// An existing node: MKDIR changes nothing and fires nothing.
		{1, OpMkdir, 0, z("/w"), []string{w(1, OpMkdir, ok)}},
		{1, OpSetPerms, 0, z("/w/x", "n0"), []string{w(1, OpSetPerms, ok), w(2, OpWatchEvent, z("/w/x", "tok"))}},
		// A watch beneath a removed node reports its own path.
		{2, OpWatch, 0, z("/w/x/y", "deep"), []string{w(2, OpWatch, ok), w(2, OpWatchEvent, z("/w/x/y", "deep"))}},
		{2, OpWatch, 0, z("/w/x/none", "absent"), []string{w(2, OpWatch, ok), w(2, OpWatchEvent, z("/w/x/none", "absent"))}},
		{1, OpRm, 0, z("/w/x"), []string{w(1, OpRm, ok), w(2, OpWatchEvent, z("/w/x", "tok")), w(2, OpWatchEvent, z("/w/x/y", "deep"))}},
		{2, OpUnwatch, 0, z("/w", "tok"), []string{w(2, OpUnwatch, ok)}},
		{2, OpUnwatch, 0, z("/w", "tok"), []string{w(2, OpError, z("ENOENT"))}},
		{1, OpWrite, 0, "/w\x00v", []string{w(1, OpWrite, ok)}},
		// Relative watches report relative paths.
		{2, OpWatch, 0, z("dev", "r"), []string{w(2, OpWatch, ok), w(2, OpWatchEvent, z("dev", "r"))}},
		{1, OpWrite, 0, "/local/domain/0/dev/1\x00v", []string{w(1, OpWrite, ok), w(2, OpWatchEvent, z("dev/1", "r"))}},
		// Special watches.
		{2, OpWatch, 0, z("@introduceDomain", "i"), []string{w(2, OpWatch, ok), w(2, OpWatchEvent, z("@introduceDomain", "i"))}},
		{2, OpWatch, 0, z("@releaseDomain", "r"), []string{w(2, OpWatch, ok), w(2, OpWatchEvent, z("@releaseDomain", "r"))}},
		{1, OpIntroduce, 0, z("6", "1234", "5"), []string{w(1, OpIntroduce, ok), w(2, OpWatchEvent, z("@introduceDomain", "i"))}},
		{1, OpIsDomainIntroduced, 0, z("6"), []string{w(1, OpIsDomainIntroduced, z("T"))}},
		{1, OpRelease, 0, z("6"), []string{w(1, OpRelease, ok), w(2, OpWatchEvent, z("@releaseDomain", "r"))}},
		{1, OpRelease, 0, z("6"), []string{w(1, OpError, z("ENOENT"))}},
		// A domain sees events only for nodes it may read.
		{3, OpWatch, 0, z("/w", "g"), []string{w(3, OpWatch, ok), w(3, OpWatchEvent, z("/w", "g"))}},
		{1, OpWrite, 0, "/w\x00v", []string{w(1, OpWrite, ok)}},
		{1, OpSetPerms, 0, z("/w", "n0", "r5"), []string{w(1, OpSetPerms, ok), w(3, OpWatchEvent, z("/w", "g"))}},
		{2, OpResetWatches, 0, "", []string{w(2, OpResetWatches, ok)}},
		{1, OpWrite, 0, "/local/domain/0/dev/1\x00v", []string{w(1, OpWrite, ok)}},
	})
}

func TestStateTransactions(t *testing.T) {
	st := runSteps(t, []step{
		{2, OpWatch, 0, z("/t", "tok"), []string{w(2, OpWatch, ok), w(2, OpWatchEvent, z("/t", "tok"))}},
		{1, OpWrite, 0, "/t/a\x001", []string{w(1, OpWrite, ok), w(2, OpWatchEvent, z("/t/a", "tok"))}},
		{1, OpTransactionStart, 0, z(""), []string{w(1, OpTransactionStart, z("1"))}},
		{1, OpRead, 1, z("/t/a"), []string{w(1, OpRead, "1")}},
		{1, OpWrite, 1, "/t/a\x002", []string{w(1, OpWrite, ok)}},
		// Isolation: others see the old value; the tx sees its own.
		{2, OpRead, 0, z("/t/a"), []string{w(2, OpRead, "1")}},
		{1, OpRead, 1, z("/t/a"), []string{w(1, OpRead, "2")}},
		// Events fire at commit, not before.
		{1, OpTransactionEnd, 1, z("T"), []string{w(1, OpTransactionEnd, ok), w(2, OpWatchEvent, z("/t/a", "tok"))}},
		{2, OpRead, 0, z("/t/a"), []string{w(2, OpRead, "2")}},
		{1, OpRead, 1, z("/t/a"), []string{w(1, OpError, z("ENOENT"))}},
		// Conflict: something the tx read changed.
		{1, OpTransactionStart, 0, z(""), []string{w(1, OpTransactionStart, z("2"))}},
		{1, OpRead, 2, z("/t/a"), []string{w(1, OpRead, "2")}},
		{1, OpWrite, 2, "/t/b\x00x", []string{w(1, OpWrite, ok)}},
		{2, OpWrite, 0, "/t/a\x003", []string{w(2, OpWrite, ok), w(2, OpWatchEvent, z("/t/a", "tok"))}},
		{1, OpTransactionEnd, 2, z("T"), []string{w(1, OpError, z("EAGAIN"))}},
		{1, OpRead, 0, z("/t/b"), []string{w(1, OpError, z("ENOENT"))}},
		// No conflict: unrelated changes elsewhere commit fine.
		{1, OpTransactionStart, 0, z(""), []string{w(1, OpTransactionStart, z("3"))}},
		{1, OpRead, 3, z("/t/a"), []string{w(1, OpRead, "3")}},
		{1, OpWrite, 3, "/t/c\x00c", []string{w(1, OpWrite, ok)}},
		{2, OpWrite, 0, "/elsewhere\x00e", []string{w(2, OpWrite, ok)}},
		{1, OpTransactionEnd, 3, z("T"), []string{w(1, OpTransactionEnd, ok), w(2, OpWatchEvent, z("/t/c", "tok"))}},
		// Abort discards.
		{1, OpTransactionStart, 0, z(""), []string{w(1, OpTransactionStart, z("4"))}},
		{1, OpRm, 4, z("/t"), []string{w(1, OpRm, ok)}},
		{1, OpDirectory, 4, z("/t"), []string{w(1, OpError, z("ENOENT"))}},
		{1, OpTransactionEnd, 4, z("F"), []string{w(1, OpTransactionEnd, ok)}},
		{1, OpDirectory, 0, z("/t"), []string{w(1, OpDirectory, z("a", "c"))}},
		// Errors.
		{1, OpTransactionEnd, 4, z("T"), []string{w(1, OpError, z("ENOENT"))}},
		{1, OpTransactionEnd, 0, z("T"), []string{w(1, OpError, z("ENOENT"))}},
		{1, OpRead, 77, z("/t"), []string{w(1, OpError, z("ENOENT"))}},
		{1, OpTransactionStart, 0, z(""), []string{w(1, OpTransactionStart, z("5"))}},
		{1, OpTransactionEnd, 5, z("X"), []string{w(1, OpError, z("EINVAL"))}},
		// A tx belongs to its connection.
		{2, OpRead, 5, z("/t"), []string{w(2, OpError, z("ENOENT"))}},
		// A created-then-seen-absent conflict: tx reads a missing node
		// that someone else then creates.
		{1, OpTransactionStart, 0, z(""), []string{w(1, OpTransactionStart, z("6"))}},
		{1, OpRead, 6, z("/t/new"), []string{w(1, OpError, z("ENOENT"))}},
		{2, OpWrite, 0, "/t/new\x00n", []string{w(2, OpWrite, ok), w(2, OpWatchEvent, z("/t/new", "tok"))}},
		{1, OpWrite, 6, "/t/other\x00o", []string{w(1, OpWrite, ok)}},
		{1, OpTransactionEnd, 6, z("T"), []string{w(1, OpError, z("EAGAIN"))}},
	})
	st.RemoveConn(1)
}

func TestStateQuota(t *testing.T) {
	st := NewState()
	st.Quota.Nodes = 3
	st.AddConn(1, 0)
	st.AddConn(3, 5)
	st.Handle(1, Message{Type: OpMkdir, Payload: joinStrings("/local/domain/5")})
	st.Handle(1, Message{Type: OpSetPerms, Payload: joinStrings("/local/domain/5", "n5")})
	// The home node counts: 1 owned, 2 more allowed.
	for i, want := range []Op{OpWrite, OpWrite, OpError} {
		o := st.Handle(3, Message{Type: OpWrite, Payload: []byte(fmt.Sprintf("k%d\x00v", i))})
		if o[0].Msg.Type != want {
			t.Fatalf("write %d: %v", i, o[0].Msg)
		}
	}
	o := st.Handle(3, Message{Type: OpWrite, Payload: append([]byte("k0\x00"), make([]byte, 2049)...)})
	if string(o[0].Msg.Payload) != z("ENOSPC") {
		t.Fatalf("node size: %v", o[0].Msg)
	}
	// Dom0 is exempt.
	o = st.Handle(1, Message{Type: OpWrite, Payload: append([]byte("/local/domain/5/big\x00"), make([]byte, 4000)...)})
	if o[0].Msg.Type != OpWrite {
		t.Fatalf("dom0: %v", o[0].Msg)
	}
}
