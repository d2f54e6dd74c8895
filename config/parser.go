package config

import (
	"cmp"
	"errors"
	"fmt"
	"math"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/blktap-go/blktap/internal/units"
	"gopkg.in/yaml.v3"
)

// The parser's reading of single values and its error collection; the
// disk entries are decoded in disk.go.

type parser struct {
	file  string
	dir   string
	errs  []error
	nodes []map[string]*yaml.Node // per decoded disk: key -> value node
}

// err joins the problems in file order.
func (p *parser) err() error {
	slices.SortStableFunc(p.errs, func(a, b error) int {
		ea, _ := a.(*Error)
		eb, _ := b.(*Error)
		if ea == nil || eb == nil {
			return 0
		}
		if c := cmp.Compare(ea.Line, eb.Line); c != 0 {
			return c
		}
		return cmp.Compare(ea.Col, eb.Col)
	})
	return errors.Join(p.errs...)
}

func (p *parser) errf(n *yaml.Node, format string, args ...any) {
	e := &Error{File: p.file, Msg: fmt.Sprintf(format, args...)}
	if n != nil {
		e.Line, e.Col = n.Line, n.Column
	}
	p.errs = append(p.errs, e)
}

// yamlErr turns yaml.v3's "yaml: line N: msg" into file:N: msg. yaml.v3
// gives no column and, for a tab in indentation, the line of the context
// rather than of the tab, so that case is located here.
func (p *parser) yamlErr(err error, data []byte) {
	if strings.Contains(err.Error(), "tab character") {
		for i, line := range strings.Split(string(data), "\n") {
			indent := line[:len(line)-len(strings.TrimLeft(line, " \t"))]
			if j := strings.IndexByte(indent, '\t'); j >= 0 {
				p.errs = append(p.errs, &Error{File: p.file, Line: i + 1, Col: j + 1,
					Msg: "a tab in the indentation; YAML indents with spaces"})
				return
			}
		}
	}
	var te *yaml.TypeError
	msgs := []string{err.Error()}
	if errors.As(err, &te) {
		msgs = te.Errors
	}
	for _, m := range msgs {
		m = strings.TrimPrefix(m, "yaml: ")
		e := &Error{File: p.file, Msg: m}
		if rest, ok := strings.CutPrefix(m, "line "); ok {
			if i := strings.Index(rest, ": "); i > 0 {
				if n, err := strconv.Atoi(rest[:i]); err == nil {
					e.Line, e.Msg = n, rest[i+2:]
				}
			}
		}
		p.errs = append(p.errs, e)
	}
}

func kindName(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	case yaml.AliasNode:
		return "an alias"
	case yaml.ScalarNode:
		if n.ShortTag() == "!!null" {
			return "nothing (null)"
		}
		return fmt.Sprintf("%s %q", strings.TrimPrefix(n.ShortTag(), "!!"), n.Value)
	}
	return "something else"
}

// fields checks a mapping's keys (strings, known, not repeated) and returns
// key -> value node, in file order via keys.
func (p *parser) fields(n *yaml.Node, what string, known ...string) map[string]*yaml.Node {
	if n.Kind == yaml.AliasNode {
		p.errf(n, "%s: anchors and aliases are not supported", what)
		return nil
	}
	if n.Kind != yaml.MappingNode {
		p.errf(n, "%s must be a mapping, not %s", what, kindName(n))
		return nil
	}
	out := make(map[string]*yaml.Node, len(n.Content)/2)
	seen := make(map[string]*yaml.Node, len(n.Content)/2)
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		if k.Kind != yaml.ScalarNode || k.ShortTag() == "!!null" {
			p.errf(k, "%s: keys must be names, not %s", what, kindName(k))
			continue
		}
		if prev, dup := seen[k.Value]; dup {
			p.errf(k, "%s: duplicate key %q (first at line %d)", what, k.Value, prev.Line)
			continue
		}
		seen[k.Value] = k
		ok := false
		for _, kn := range known {
			ok = ok || k.Value == kn
		}
		if !ok {
			p.errf(k, "%s: unknown key %q (valid: %s)", what, k.Value, strings.Join(known, ", "))
			continue
		}
		if v.Kind == yaml.AliasNode {
			p.errf(v, "%s: %s: anchors and aliases are not supported", what, k.Value)
			continue
		}
		out[k.Value] = v
	}
	return out
}

// str reads a scalar as text. Numbers are accepted (device: 51728), null,
// lists and mappings are not.
func (p *parser) str(n *yaml.Node, what string) (string, bool) {
	if n.Kind != yaml.ScalarNode || n.ShortTag() == "!!null" {
		p.errf(n, "%s must be a string, not %s", what, kindName(n))
		return "", false
	}
	if t := n.ShortTag(); t != "!!str" && t != "!!int" && t != "!!float" {
		p.errf(n, "%s must be a string, not %s", what, kindName(n))
		return "", false
	}
	if n.Value == "" {
		p.errf(n, "%s is empty", what)
		return "", false
	}
	if strings.ContainsRune(n.Value, 0) {
		p.errf(n, "%s contains a NUL byte", what)
		return "", false
	}
	return n.Value, true
}

// integer reads a YAML integer in [lo, hi].
func (p *parser) integer(n *yaml.Node, what string, lo, hi int64) (int64, bool) {
	if n.Kind != yaml.ScalarNode || n.ShortTag() != "!!int" {
		p.errf(n, "%s must be an integer, not %s", what, kindName(n))
		return 0, false
	}
	v, err := strconv.ParseInt(strings.ReplaceAll(n.Value, "_", ""), 0, 64)
	if err != nil || v < lo || v > hi {
		p.errf(n, "%s must be an integer from %d to %d, not %s", what, lo, hi, n.Value)
		return 0, false
	}
	return v, true
}

// size reads a byte count: an integer, or a string with a K/M/G/T/P/E suffix.
func (p *parser) size(n *yaml.Node, what string) (int64, bool) {
	if n.Kind == yaml.ScalarNode && n.ShortTag() == "!!int" {
		return p.integer(n, what, 0, math.MaxInt64)
	}
	if n.Kind != yaml.ScalarNode || n.ShortTag() != "!!str" {
		p.errf(n, "%s must be a size like 512M or 4G, not %s", what, kindName(n))
		return 0, false
	}
	v, err := units.ParseSize(n.Value)
	if err != nil {
		p.errf(n, "%s: %v", what, err)
		return 0, false
	}
	return v, true
}

// path reads a file path and makes it absolute against the file's directory.
func (p *parser) path(n *yaml.Node, what string) (string, bool) {
	s, ok := p.str(n, what)
	if !ok {
		return "", false
	}
	if !filepath.IsAbs(s) {
		s = filepath.Join(p.dir, s)
	}
	return filepath.Clean(s), true
}

// boolean reads a YAML true or false.
func (p *parser) boolean(n *yaml.Node, what string) (bool, bool) {
	if n.Kind == yaml.ScalarNode && n.ShortTag() == "!!bool" {
		if v, err := strconv.ParseBool(strings.ToLower(n.Value)); err == nil {
			return v, true
		}
	}
	p.errf(n, "%s must be true or false, not %s", what, kindName(n))
	return false, false
}
