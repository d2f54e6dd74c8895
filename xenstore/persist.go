package xenstore

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// A saved tree is one JSON document:
//
//	{"format": "blktap-xenstored-tree", "version": 1,
//	 "nodes": [{"path": "/", "perms": ["n0"], "value": "<base64>"}, ...]}
//
// Nodes come parents first (every node's parent precedes it), with their
// permissions in wire form (owner first) and their values as bytes.
// Watches, transactions, connections and introduced domains are not saved:
// clients reconnect and set theirs up again.
const (
	treeFormat  = "blktap-xenstored-tree"
	treeVersion = 1
	// maxTreeFile bounds what LoadTree reads (a tree this big is not ours).
	maxTreeFile = 256 << 20
)

type savedTree struct {
	Format  string      `json:"format"`
	Version int         `json:"version"`
	Nodes   []savedNode `json:"nodes"`
}

type savedNode struct {
	Path  string   `json:"path"`
	Perms []string `json:"perms"`
	Value []byte   `json:"value"`
}

// encodeTree renders the tree under root. Trees are never modified once
// reachable (store.go), so root may be read without the server's lock.
func encodeTree(root *node) ([]byte, error) {
	t := savedTree{Format: treeFormat, Version: treeVersion}
	walk(root, "/", func(p string, n *node) {
		perms := make([]string, len(n.perms))
		for i, pm := range n.perms {
			perms[i] = pm.String()
		}
		t.Nodes = append(t.Nodes, savedNode{Path: p, Perms: perms, Value: n.value})
	})
	return json.Marshal(t)
}

// decodeTree checks and rebuilds a saved tree; every node gets a generation
// from gen (so transactions see them as existing).
func decodeTree(data []byte, gen func() uint64) (*node, error) {
	var t savedTree
	if err := json.Unmarshal(data, &t); err != nil {
		return nil, fmt.Errorf("%w: saved tree: %v", ErrInvalid, err)
	}
	if t.Format != treeFormat || t.Version != treeVersion {
		return nil, fmt.Errorf("%w: saved tree: format %q version %d, want %q %d", ErrInvalid, t.Format, t.Version, treeFormat, treeVersion)
	}
	if len(t.Nodes) == 0 || t.Nodes[0].Path != "/" {
		return nil, fmt.Errorf("%w: saved tree: the first node is not /", ErrInvalid)
	}
	var root *node
	for i, sn := range t.Nodes {
		perms := make([]Perm, len(sn.Perms))
		for j, s := range sn.Perms {
			pm, err := ParsePerm(s)
			if err != nil {
				return nil, fmt.Errorf("saved tree: node %s: %w", sn.Path, err)
			}
			perms[j] = pm
		}
		if len(perms) == 0 {
			return nil, fmt.Errorf("%w: saved tree: node %s has no permissions", ErrInvalid, sn.Path)
		}
		value := sn.Value
		if value == nil {
			value = []byte{}
		}
		n := &node{value: value, perms: perms, gen: gen()}
		if i == 0 {
			root = n
			continue
		}
		if p, err := CanonicalPath(0, sn.Path, false); err != nil || p != sn.Path || sn.Path == "/" {
			return nil, fmt.Errorf("%w: saved tree: bad path %q", ErrInvalid, sn.Path)
		}
		parent := parentOf(sn.Path)
		if lookup(root, parent) == nil {
			return nil, fmt.Errorf("%w: saved tree: %s comes before its parent", ErrInvalid, sn.Path)
		}
		if lookup(root, sn.Path) != nil {
			return nil, fmt.Errorf("%w: saved tree: %s twice", ErrInvalid, sn.Path)
		}
		n.name = sn.Path[len(parent):]
		if parent != "/" {
			n.name = n.name[1:]
		}
		root = insertAt(root, elems(parent), n)
	}
	return root, nil
}

// insertAt returns a copy of root with n added under the node at path
// elements (which must exist).
func insertAt(root *node, path []string, n *node) *node {
	if len(path) == 0 {
		return root.withChild(n)
	}
	return root.withChild(insertAt(root.child(path[0]), path[1:], n))
}

// LoadTree replaces the server's tree with the one saved at path (by
// PersistTo). A missing file leaves the tree as it is and returns false; a
// damaged one is an error and changes nothing. Call it before serving.
func (s *Server) LoadTree(path string) (bool, error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	} else if err != nil {
		return false, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxTreeFile+1))
	if err != nil {
		return false, err
	}
	if len(data) > maxTreeFile {
		return false, fmt.Errorf("%s: more than %d bytes, larger than a saved tree may be", path, maxTreeFile)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.mu.st
	root, err := decodeTree(data, st.nextGen)
	if err != nil {
		return false, fmt.Errorf("%s: %w", path, err)
	}
	old := st.root
	st.root = root
	if err := st.Check(); err != nil {
		st.root = old
		return false, fmt.Errorf("%s: %w", path, err)
	}
	if s.persist != nil {
		s.persist.saved = root
	}
	return true, nil
}

// persister saves the tree after changes. Its fields are guarded by the
// server's mu, except where noted.
type persister struct {
	path  string
	delay time.Duration
	kick  chan struct{} // capacity 1
	stop  chan struct{}
	done  chan struct{}
	once  sync.Once
	saved *node // the root last written (or loaded)
	// encodeCost is what encoding the last save took; persistLoop's own.
	encodeCost time.Duration
}

// PersistTo makes the server save its tree to path after every change,
// at most once per delay (changes in between are saved together), and
// once more on Close. Each save goes to a temporary file that is synced,
// renamed over path, and the directory synced: a crash at any moment
// leaves path holding either the previous tree or the new one. Call it
// once, before serving.
func (s *Server) PersistTo(path string, delay time.Duration) {
	// Temporary files of saves a crash interrupted: never renamed, never
	// read.
	if stale, err := filepath.Glob(filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")); err == nil {
		for _, f := range stale {
			os.Remove(f)
		}
	}
	p := &persister{path: path, delay: delay, kick: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}
	s.mu.Lock()
	p.saved = s.mu.st.root
	s.persist = p
	s.mu.Unlock()
	go s.persistLoop(p)
}

// noteChangeLocked is called with mu held after each request.
func (s *Server) noteChangeLocked() {
	p := s.persist
	if p == nil || s.mu.st.root == p.saved {
		return
	}
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

func (s *Server) persistLoop(p *persister) {
	defer close(p.done)
	for {
		select {
		case <-p.kick:
		case <-p.stop:
			s.saveTree(p)
			return
		}
		select {
		case <-time.After(max(p.delay, p.encodeCost*saveCostFactor)):
		case <-p.stop:
		}
		s.saveTree(p)
	}
}

// saveCostFactor spaces saves by at least this many times what encoding
// the last one cost: each save encodes the whole tree, so at a fixed
// delay a tree growing with the disks, changing throughout a convergence
// that also grows with them, cost time quadratic in the disks.
const saveCostFactor = 10

// saveTree writes the current tree if it changed since the last save.
func (s *Server) saveTree(p *persister) {
	s.mu.Lock()
	root := s.mu.st.root
	same := root == p.saved
	s.mu.Unlock()
	if same {
		return
	}
	began := time.Now()
	data, err := encodeTree(root)
	p.encodeCost = time.Since(began) // only persistLoop reads it
	if err == nil {
		err = writeFileSynced(p.path, data, 0o600)
	}
	if err != nil {
		// The previous save stands; the next change tries again.
		s.log.Error("xenstored: saving the tree", "path", p.path, "err", err)
		return
	}
	s.mu.Lock()
	p.saved = root
	s.mu.Unlock()
}

// writeFileSynced replaces path with data so that a crash leaves either
// the old contents or the new: temporary file, fsync, rename, fsync of
// the directory.
func writeFileSynced(path string, data []byte, mode os.FileMode) error {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name()) // after a successful rename, a no-op
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
